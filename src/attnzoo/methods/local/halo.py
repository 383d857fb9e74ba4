"""HaloNet: blocked local attention, each block of queries attending to its block plus a halo."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import check_int, per_axis
from ...kernels.block_sparse.builders import box_layout
from ...method import Call, MethodInfo
from ...registry import register
from .base import SpatialConfig, SpatialMethod


@dataclass
class HaloConfig(SpatialConfig):
    """``block_size`` queries per block side; ``halo`` extra key rows/columns around each block."""

    block_size: int | tuple[int, ...] = 8
    halo: int | tuple[int, ...] = 3

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.halo, int):
            check_int("halo", self.halo, minimum=0)


@register
class Halo(SpatialMethod):
    """Queries are split into non-overlapping blocks; a block attends to the keys of the same block
    grown by ``halo`` on every side, truncated at the grid border (padding keys are excluded rather
    than zero-padded) ("Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
    arXiv 2103.12731). q, k, v (B, H, N, D), N = num_global + prod(grid)."""

    info = MethodInfo(
        name="halo", title="Scaling Local Self-Attention for Parameter Efficient Visual Backbones", arxiv="2103.12731",
        family=("local",), causal=False, non_causal=True, cross=False, gqa=True, training_free=True,
        time="O(N (b + 2h)^d D)", memory="O(N (b + 2h)^d) bools of cached mask", spatial=True,
        summary="blocked local attention with a halo",
    )
    Config = HaloConfig

    def _axes(self, call: Call):
        grid = self.grid(call)
        return grid, per_axis("block_size", self.config.block_size, len(grid)), per_axis("halo", self.config.halo, len(grid), minimum=0)

    def mask_mod(self, call: Call):
        grid, block, halo = self._axes(call)

        def inner(h, qc, kc):
            allowed = None
            for a in range(len(grid)):
                start = (qc[a] // block[a]) * block[a]
                ok = (kc[a] >= start - halo[a]) & (kc[a] < start + block[a] + halo[a])
                allowed = ok if allowed is None else allowed & ok
            return allowed

        return self.with_globals(call, inner)

    def build_layout(self, call: Call):
        grid, block, halo = self._axes(call)

        def span(a):
            return lambda c: ((c // block[a]) * block[a] - halo[a], (c // block[a] + 1) * block[a] + halo[a])

        tile = tuple(min(b, n) for b, n in zip(block, grid))
        return box_layout(grid, self.config.num_global, tile, [span(a) for a in range(len(grid))], call.device)

    def reference_mask(self, call: Call) -> torch.Tensor:
        """Per axis: block of the query, then the keys within ``halo`` of that block."""
        grid, block, halo = self._axes(call)
        axes = []
        for n, b, h in zip(grid, block, halo):
            axis = torch.zeros(n, n, dtype=torch.bool)
            for first in range(0, n, b):
                axis[first : first + b, max(0, first - h) : first + b + h] = True
            axes.append(axis)
        return self.axes_product_mask(call, axes)
