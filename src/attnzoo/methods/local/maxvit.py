"""MaxViT's multi-axis attention: block (local windows) and grid (dilated, global) attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import InvalidArgumentError, per_axis
from ...kernels.block_sparse.builders import box_layout, compact
from ...method import Call, MethodInfo
from ...registry import register
from .base import SpatialConfig, SpatialMethod

_TITLE = "MaxViT: Multi-Axis Vision Transformer"


@dataclass
class BlockConfig(SpatialConfig):
    """``block_size``: side P of the non-overlapping windows (per axis or one int)."""

    block_size: int | tuple[int, ...] = 7


@dataclass
class GridConfig(SpatialConfig):
    """``grid_size``: G, the number of tokens per axis in each dilated group (per axis or one int)."""

    grid_size: int | tuple[int, ...] = 7


@register
class MaxVitBlock(SpatialMethod):
    """Block attention: tokens attend within non-overlapping P x P windows (MaxViT, arXiv 2204.01697;
    the last window along an axis is smaller when P does not divide the grid). q, k, v (B, H, N, D)."""

    info = MethodInfo(
        name="maxvit_block", title=_TITLE, arxiv="2204.01697", family=("local",), causal=False, non_causal=True,
        cross=False, gqa=True, training_free=True, time="O(N P^d D)", memory="O(N) tensors", spatial=True,
        summary="MaxViT block attention (local windows)",
    )
    Config = BlockConfig

    def _block(self, call: Call):
        grid = self.grid(call)
        return grid, tuple(min(p, n) for p, n in zip(per_axis("block_size", self.config.block_size, len(grid)), grid))

    def mask_mod(self, call: Call):
        _, block = self._block(call)
        return self.with_globals(call, lambda h, qc, kc: _same_window(qc, kc, block))

    def build_layout(self, call: Call):
        grid, block = self._block(call)
        spans = [(lambda p: lambda c: ((c // p) * p, (c // p + 1) * p))(p) for p in block]
        return box_layout(grid, self.config.num_global, block, spans, call.device)

    def reference_mask(self, call: Call) -> torch.Tensor:
        grid, block = self._block(call)
        axes = [(torch.arange(n)[:, None] // p) == (torch.arange(n)[None, :] // p) for n, p in zip(grid, block)]
        return self.axes_product_mask(call, axes)


def _same_window(qc, kc, block):
    allowed = None
    for a, p in enumerate(block):
        ok = (qc[a] // p) == (kc[a] // p)
        allowed = ok if allowed is None else allowed & ok
    return allowed


@register
class MaxVitGrid(SpatialMethod):
    """Grid attention: a fixed G x G grid of tokens spaced n/G apart attend to each other, a sparse
    dilated global mixing (MaxViT, arXiv 2204.01697); G must divide the grid. Tokens are visited
    group by group, so each group runs as one dense block. q, k, v (B, H, N, D)."""

    info = MethodInfo(
        name="maxvit_grid", title=_TITLE, arxiv="2204.01697", family=("local",), causal=False, non_causal=True,
        cross=False, gqa=True, training_free=True, time="O(N G^d D)", memory="O(N) tensors", spatial=True,
        summary="MaxViT grid attention (dilated global groups)",
    )
    Config = GridConfig

    def _strides(self, call: Call):
        grid = self.grid(call)
        return grid, tuple(n // g for n, g in zip(grid, per_axis("grid_size", self.config.grid_size, len(grid))))

    def check_grid(self, grid, call: Call) -> None:
        for a, (n, g) in enumerate(zip(grid, per_axis("grid_size", self.config.grid_size, len(grid)))):
            if n % g:
                raise InvalidArgumentError(f"grid_size[{a}]", f"a divisor of the grid size {n} along axis {a}", g)

    def mask_mod(self, call: Call):
        _, strides = self._strides(call)

        def inner(h, qc, kc):
            allowed = None
            for a, s in enumerate(strides):
                ok = (qc[a] % s) == (kc[a] % s)
                allowed = ok if allowed is None else allowed & ok
            return allowed

        return self.with_globals(call, inner)

    def build_layout(self, call: Call):
        grid, strides = self._strides(call)
        G = self.config.num_global
        coords = torch.cartesian_prod(*[torch.arange(n, device=call.device) for n in grid]).view(-1, len(grid))
        key = [coords[:, a] % s for a, s in enumerate(strides)] + [coords[:, a] // s for a, s in enumerate(strides)]
        order = torch.arange(coords.shape[0], device=call.device)
        for part in reversed(key):  # lexicographic: group first, then position inside the group
            order = order[torch.sort(part[order], stable=True).indices]
        group = math.prod(n // s for n, s in zip(grid, strides))
        members = (order + G).view(-1, group)
        if G:
            members_keys = torch.cat([torch.arange(G, device=call.device).expand(members.shape[0], -1), members], dim=1)
        else:
            members_keys = members
        return compact(members_keys, members.numel(), call.len_kv, group, q_order=members.flatten())

    def reference_mask(self, call: Call) -> torch.Tensor:
        grid, strides = self._strides(call)
        axes = [(torch.arange(n)[:, None] % s) == (torch.arange(n)[None, :] % s) for n, s in zip(grid, strides)]
        return self.axes_product_mask(call, axes)
