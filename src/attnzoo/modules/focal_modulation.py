"""FocalNet's focal modulation: gated multi-level context modulating a query."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError, check_int
from ..registry import ComponentInfo
from . import AttentionModule, register
from ._checks import check_image


@register
class FocalModulation(AttentionModule):
    """Focal modulation: x (B, H, W, C) channels-last, as the paper's code -> (B, H, W, C).

    Yang et al., "Focal Modulation Networks" (arXiv 2203.11926). A linear layer gives the query
    q, the context z^0 and L+1 gates G; L depth-wise convolutions with GELU, kernel
    ``focal_window + focal_factor * l``, stack into z^1..z^L (growing receptive fields), and
    z^{L+1} = GELU(global mean of z^L). The modulator m = h(sum_l G_l * z^l) (h a 1x1
    convolution, optionally divided by L+1 with ``normalize_modulator``), and the output is
    proj(q * m) (LayerNorm on q * m first with ``post_norm``). FocalNet-T/S/B use
    ``focal_level=2`` (SRF) or 3 (LRF) with ``focal_window=3``. Absent: dropout, the FocalNet
    blocks and stages around it.
    """

    info = ComponentInfo(
        name="FocalModulation",
        title="Focal Modulation Networks",
        arxiv="2203.11926",
        family=("module",),
        summary="hierarchical depth-wise contexts + a global one, gated per token, modulate a query element-wise",
    )

    def __init__(self, dim: int, focal_level: int = 2, focal_window: int = 3, focal_factor: int = 2, *,
                 bias: bool = True, normalize_modulator: bool = False, post_norm: bool = False):
        super().__init__()
        self.dim = check_int("dim", dim)
        self.focal_level = check_int("focal_level", focal_level)
        focal_window = check_int("focal_window", focal_window)
        focal_factor = check_int("focal_factor", focal_factor, minimum=0)
        if focal_window % 2 == 0 or focal_factor % 2:
            raise InvalidArgumentError("focal_window, focal_factor", "an odd window and an even factor (odd kernels keep the map's size)",
                                       (focal_window, focal_factor))
        for name, value in (("bias", bias), ("normalize_modulator", normalize_modulator), ("post_norm", post_norm)):
            if not isinstance(value, bool):
                raise InvalidArgumentError(name, "a bool", repr(value))
        self.normalize_modulator = normalize_modulator
        self.kernel_sizes = [focal_window + focal_factor * level for level in range(focal_level)]
        self.inputs = nn.Linear(dim, 2 * dim + focal_level + 1, bias=bias)
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False), nn.GELU()) for k in self.kernel_sizes)
        self.modulator = nn.Conv2d(dim, dim, 1, bias=bias)
        self.norm = nn.LayerNorm(dim) if post_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image("x", x, self.dim, channels_last=True)
        q, context, gates = self.inputs(x).permute(0, 3, 1, 2).split([self.dim, self.dim, self.focal_level + 1], dim=1)
        aggregated = torch.zeros_like(context)
        for level, layer in enumerate(self.levels):
            context = layer(context)
            aggregated = aggregated + context * gates[:, level : level + 1]
        global_context = self.act(context.mean(dim=(2, 3), keepdim=True))
        aggregated = aggregated + global_context * gates[:, self.focal_level :]
        if self.normalize_modulator:
            aggregated = aggregated / (self.focal_level + 1)
        out = (q * self.modulator(aggregated)).permute(0, 2, 3, 1)
        return self.proj(self.norm(out))
