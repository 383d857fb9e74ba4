"""CLEAR: a circular local window on the latent grid of a diffusion transformer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import check_float
from ...kernels.block_sparse.builders import box_layout, tile_shape
from ...method import Call, MethodInfo
from ...registry import register
from .base import SpatialConfig, SpatialMethod


@dataclass
class ClearConfig(SpatialConfig):
    """``radius``: keys at Euclidean distance strictly below it (in grid cells) of the query are
    visible (the official mask ``dist^2 < r^2``: 193 keys at r = 8)."""

    radius: float = 8.0

    def __post_init__(self):
        super().__post_init__()
        self.radius = check_float("radius", self.radius, low=0.0, high=float("inf"), low_open=True)


@register
class Clear(SpatialMethod):
    """Each grid token attends to the keys strictly inside a circle of ``radius`` around it
    (truncated at the borders), and the ``num_global`` leading tokens (a DiT's text tokens) attend to and are attended
    by everything ("CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up",
    arXiv 2412.16112). q, k, v (B, H, N, D), N = num_global + prod(grid)."""

    info = MethodInfo(
        name="clear", title="CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up", arxiv="2412.16112",
        family=("local", "learned"), causal=False, non_causal=True, cross=False, gqa=True, training_free=False,
        time="O(N r^2 D)", memory="O(N r^2) bools of cached mask", spatial=True,
        summary="circular local window on the 2-D grid, global (text) tokens kept",
    )
    Config = ClearConfig
    ndims = (2, 3)

    def mask_mod(self, call: Call):
        r2 = self.config.radius ** 2

        def inner(h, qc, kc):
            dist2 = sum((a - b) ** 2 for a, b in zip(qc, kc))
            return dist2 < r2

        return self.with_globals(call, inner)

    def build_layout(self, call: Call):
        grid, r = self.grid(call), int(self.config.radius)
        spans = [lambda c: (c - r, c + r + 1)] * len(grid)
        return box_layout(grid, self.config.num_global, tile_shape(grid), spans, call.device)

    def reference_mask(self, call: Call) -> torch.Tensor:
        grid = self.grid(call)
        coords = torch.cartesian_prod(*[torch.arange(n, dtype=torch.float64) for n in grid]).view(-1, len(grid))
        dist2 = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1)  # exact on integer cells
        return self.embed_grid_mask(call, dist2 < self.config.radius ** 2)
