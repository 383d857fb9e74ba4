"""ELA: efficient local attention from strip pooling along H and W."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError, check_int
from ..registry import ComponentInfo
from . import AttentionModule, register
from ._checks import check_image

# The paper's variants: (kernel size, channels per convolution group, GroupNorm groups).
# T and B convolve each channel alone; S and L share a kernel across 8 channels.
VARIANTS: dict[str, tuple[int, int, int]] = {"T": (5, 1, 32), "B": (7, 1, 16), "S": (5, 8, 16), "L": (7, 8, 16)}


@register
class ELA(AttentionModule):
    """Efficient local attention: x (B, C, H, W) -> (B, C, H, W).

    Xu and Wan, "ELA: Efficient Local Attention for Deep Convolutional Neural Networks" (arXiv
    2403.01123). Average strip pooling gives z_h (B, C, H) and z_w (B, C, W); one shared 1-D
    convolution and GroupNorm, then a sigmoid, turn each into a positional attention vector,
    and y = x * a_h (over rows) * a_w (over columns). ``variant`` picks the paper's
    configurations (``VARIANTS``: ELA-T k=5, groups=C, GN 32; ELA-B k=7, groups=C, GN 16; ELA-S
    k=5, groups=C/8, GN 16; ELA-L k=7, groups=C/8, GN 16); ``kernel_size``, ``groups`` (of the
    convolution) and ``norm_groups`` override it. Absent: the backbones and detectors of the
    paper's experiments.
    """

    info = ComponentInfo(
        name="ELA",
        title="ELA: Efficient Local Attention for Deep Convolutional Neural Networks",
        arxiv="2403.01123",
        family=("module",),
        summary="strip pooling along H and W, a shared 1-D conv + GroupNorm + sigmoid per axis; x * a_h * a_w",
    )

    def __init__(self, channels: int, variant: str = "B", *, kernel_size: int | None = None,
                 groups: int | None = None, norm_groups: int | None = None):
        super().__init__()
        self.channels = check_int("channels", channels)
        if variant not in VARIANTS:
            raise InvalidArgumentError("variant", f"one of {sorted(VARIANTS)}", repr(variant))
        default_kernel, channels_per_group, default_norm_groups = VARIANTS[variant]
        kernel_size = check_int("kernel_size", default_kernel if kernel_size is None else kernel_size)
        if kernel_size % 2 == 0:
            raise InvalidArgumentError("kernel_size", "an odd integer (the strip keeps its length)", kernel_size)
        groups = check_int("groups", max(1, channels // channels_per_group) if groups is None else groups)
        norm_groups = check_int("norm_groups", min(default_norm_groups, channels) if norm_groups is None else norm_groups)
        for name, value in (("groups", groups), ("norm_groups", norm_groups)):
            if channels % value:
                raise InvalidArgumentError(name, f"a divisor of channels={channels}", value)
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False)
        self.norm = nn.GroupNorm(norm_groups, channels)

    def axis_attention(self, strip: torch.Tensor) -> torch.Tensor:
        """A pooled strip (B, C, L) -> its attention vector (B, C, L) in (0, 1)."""
        return torch.sigmoid(self.norm(self.conv(strip)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image("x", x, self.channels)
        rows = self.axis_attention(x.mean(dim=3))  # (B, C, H)
        columns = self.axis_attention(x.mean(dim=2))  # (B, C, W)
        return x * rows.unsqueeze(3) * columns.unsqueeze(2)
