"""Neighborhood Attention (NATTEN semantics), 1-D/2-D/3-D, with dilation and per-axis causality."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import InvalidArgumentError, per_axis, per_axis_bool
from ...kernels.block_sparse.builders import box_layout, tile_shape
from ...method import Call, MethodInfo
from ...registry import register
from .base import SpatialConfig, SpatialMethod


@dataclass
class NeighborhoodConfig(SpatialConfig):
    """``kernel_size``, ``dilation``, ``is_causal``: an int/bool or one per grid axis."""

    kernel_size: int | tuple[int, ...] = 7
    dilation: int | tuple[int, ...] = 1
    is_causal: bool | tuple[bool, ...] = False


def axis_window(i: torch.Tensor, length: int, kernel: int, dilation: int, causal: bool):
    """NATTEN's window on one axis: (group, first, count) in the dilation group's own coordinates.

    A query at i belongs to group i % dilation; inside it, a non-causal window of ``kernel`` keys is
    centred and shifted inward at the borders (so every query sees exactly ``kernel`` keys); a
    causal window holds the ``kernel`` most recent keys, fewer at the start.
    """
    group, ii = i % dilation, i // dilation
    group_len = (length - group + dilation - 1) // dilation
    if causal:
        first = (ii - kernel + 1).clamp(min=0)
        return group, first, ii - first + 1
    first = torch.minimum((ii - kernel // 2).clamp(min=0), group_len - kernel)
    return group, first, torch.full_like(ii, kernel)


@register
class Neighborhood(SpatialMethod):
    """Each token attends to its nearest neighbours on the grid ("Neighborhood Attention Transformer",
    arXiv 2204.07143; "Faster Neighborhood Attention", arXiv 2403.04690): per axis a window of
    ``kernel_size`` keys spaced ``dilation`` apart, shifted inward at borders, optionally causal.

    q, k, v (B, H, N, D) with N = num_global + prod(grid), tokens row-major; runs as tiles of
    queries against the box of keys their windows cover (batched GEMM, as in the paper).
    """

    info = MethodInfo(
        name="neighborhood", title="Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock Level",
        arxiv="2403.04690", family=("local",), causal=True, non_causal=True, cross=False, gqa=True,
        training_free=True, time="O(N prod(kernel) D)", memory="O(N prod(kernel + tile)) bools of cached mask",
        spatial=True, summary="1-D/2-D/3-D neighborhood attention with dilation and per-axis causality",
    )
    Config = NeighborhoodConfig

    def _axes(self, call: Call):
        grid = self.grid(call)
        nd = len(grid)
        kernel = per_axis("kernel_size", self.config.kernel_size, nd)
        dilation = per_axis("dilation", self.config.dilation, nd)
        causal = per_axis_bool("is_causal", self.config.is_causal, nd)
        if call.causal:
            causal = (True,) * nd  # causal along every axis implies causal in row-major order
        return grid, kernel, dilation, causal

    def check_grid(self, grid, call: Call) -> None:
        _, kernel, dilation, causal = self._axes(call)
        for a, (n, k, d, c) in enumerate(zip(grid, kernel, dilation, causal)):
            if k * d > n:
                raise InvalidArgumentError(f"kernel_size[{a}] * dilation[{a}]", f"at most the grid size {n} along axis {a}", f"{k} * {d} = {k * d}")
            if not c and k % 2 == 0:
                raise InvalidArgumentError(f"kernel_size[{a}]", "an odd size on a non-causal axis (the window is centred)", k)

    def mask_mod(self, call: Call):
        grid, kernel, dilation, causal = self._axes(call)

        def inner(h, qc, kc):
            allowed = None
            for a in range(len(grid)):
                group, first, count = axis_window(qc[a], grid[a], kernel[a], dilation[a], causal[a])
                pos = kc[a] // dilation[a]
                ok = (kc[a] % dilation[a] == group) & (pos >= first) & (pos < first + count)
                allowed = ok if allowed is None else allowed & ok
            return allowed

        return self.with_globals(call, inner)

    def build_layout(self, call: Call):
        grid, kernel, dilation, causal = self._axes(call)

        def span(a):
            def f(c):
                group, first, count = axis_window(c, grid[a], kernel[a], dilation[a], causal[a])
                return first * dilation[a] + group, (first + count - 1) * dilation[a] + group + 1
            return f

        return box_layout(grid, self.config.num_global, tile_shape(grid), [span(a) for a in range(len(grid))], call.device)

    def reference_mask(self, call: Call) -> torch.Tensor:
        """Written from the definition, one query at a time per axis, then combined across axes."""
        grid, kernel, dilation, causal = self._axes(call)
        axes = []
        for n, k, d, c in zip(grid, kernel, dilation, causal):
            axis = torch.zeros(n, n, dtype=torch.bool)
            for i in range(n):
                same = [j for j in range(n) if j % d == i % d]  # the query's dilation group, in order
                pos = same.index(i)
                if c:
                    window = same[max(0, pos - k + 1) : pos + 1]
                else:
                    start = min(max(pos - k // 2, 0), len(same) - k)
                    window = same[start : start + k]
                axis[i, window] = True
            axes.append(axis)
        return self.axes_product_mask(call, axes)
