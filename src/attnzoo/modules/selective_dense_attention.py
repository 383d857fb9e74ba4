"""SDANet's selective dense attention: channel- and spatial-wise attention across feature-pyramid levels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InvalidArgumentError, check_float, check_int
from ..method import Method
from ..registry import ComponentInfo, as_method
from . import AttentionModule, register
from ._checks import check_tensor


@register
class SelectiveDenseAttention(AttentionModule):
    """Selective dense attention for one pyramid level: num_levels maps (B, C, H_l, W_l) -> (B, C, H_r, W_r), r = refine_level.

    Wang et al., "Towards Real-World Prohibited Item Detection: A Large-Scale X-ray Benchmark"
    (SDANet, arXiv 2108.07020), with the official code's layout. Every level is brought to the size
    of level ``refine_level`` (adaptive max-pooling of finer levels, nearest upsampling of coarser
    ones; levels are ordered fine to coarse) and summed into U. Dense attention: channel-wise, a
    squeeze of U (global average, 1x1 conv to ``hidden_dim``, batch norm, ReLU) and one 1x1 conv per
    level give per-level channel weights, softmax over the levels; spatial-wise, the channel mean
    and max of U and one ``kernel_size`` conv per level give per-level spatial weights, softmax over
    the levels. The two weighted sums of the levels are added; the dependency refinement is a
    global-context block (attention pooling over positions, run as a one-query attention through
    attnzoo's ``method``, then 1x1 conv, layer norm, ReLU, 1x1 conv of ``context_ratio`` * C
    channels, added back; its last conv starts at zero); the result is added to the level's input.
    SDANet applies one such block per level (``refine_level`` 0 .. num_levels-1) after an FPN.

    Absent: the backbone, the FPN and the detection heads (Cascade Mask R-CNN) of SDANet.
    """

    info = ComponentInfo(
        name="SelectiveDenseAttention", title="Towards Real-World Prohibited Item Detection: A Large-Scale X-ray Benchmark",
        arxiv="2108.07020", family=("module",),
        summary="SDANet: channel- and spatial-wise attention selecting across pyramid levels, global-context refinement")

    def __init__(self, channels: int = 256, num_levels: int = 5, refine_level: int = 0, *, hidden_dim: int = 128,
                 kernel_size: int = 7, context_ratio: float = 1 / 16, method: str | Method = "dense", **config: Any):
        super().__init__()
        self.channels = check_int("channels", channels)
        self.num_levels = check_int("num_levels", num_levels)
        self.refine_level = check_int("refine_level", refine_level, minimum=0)
        if self.refine_level >= self.num_levels:
            raise InvalidArgumentError("refine_level", f"a level index below num_levels={self.num_levels}", refine_level)
        kernel_size = check_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise InvalidArgumentError("kernel_size", "an odd integer (same-size spatial attention maps)", kernel_size)
        context_dim = max(1, int(self.channels * check_float("context_ratio", context_ratio, low=0, high=1, low_open=True)))
        hidden_dim = check_int("hidden_dim", hidden_dim)
        self.channel_squeeze = nn.Sequential(nn.Conv2d(self.channels, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim),
                                             nn.ReLU())
        self.channel_logits = nn.Conv2d(hidden_dim, self.num_levels * self.channels, 1)  # one 1x1 conv per level
        self.spatial_logits = nn.Conv2d(2, self.num_levels, kernel_size, padding=kernel_size // 2, bias=False)
        self.context_logits = nn.Conv2d(self.channels, 1, 1)
        self.context_transform = nn.Sequential(nn.Conv2d(self.channels, context_dim, 1), nn.LayerNorm([context_dim, 1, 1]),
                                               nn.ReLU(), nn.Conv2d(context_dim, self.channels, 1))
        nn.init.zeros_(self.context_transform[-1].weight)
        nn.init.zeros_(self.context_transform[-1].bias)
        self.method = as_method(method, **config)
        self.method.materialize(1, 1, 1, self.channels)

    def gather(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The levels at the refine level's size, stacked: (B, num_levels, C, H_r, W_r)."""
        if not isinstance(features, (list, tuple)) or len(features) != self.num_levels:
            got = f"{len(features)} items" if isinstance(features, (list, tuple)) else type(features).__name__
            raise InvalidArgumentError("features", f"a list of {self.num_levels} feature maps (one per level)", got)
        dtype = self.channel_logits.weight.dtype
        batch = features[0].shape[0] if isinstance(features[0], torch.Tensor) else None
        for i, f in enumerate(features):
            check_tensor(f"features[{i}]", f, (batch, self.channels, None, None), f"(batch, {self.channels}, height, width)",
                         dtype)
        size = features[self.refine_level].shape[-2:]
        gathered = [F.adaptive_max_pool2d(f, size) if i < self.refine_level else
                    f if i == self.refine_level else F.interpolate(f, size=size, mode="nearest")
                    for i, f in enumerate(features)]
        return torch.stack(gathered, dim=1)

    def global_context(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> its attention-pooled context (B, C, 1, 1): softmax over positions of a 1x1 conv."""
        B, C = x.shape[:2]
        keys = self.context_logits(x).flatten(2).unsqueeze(-1)  # (B, 1, HW, 1)
        values = x.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, C)
        query = torch.ones(B, 1, 1, 1, dtype=x.dtype, device=x.device)
        pooled = self.method(query, keys, values, scale=1.0, check_finite=False)  # (B, 1, 1, C)
        return pooled.reshape(B, C, 1, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: num_levels maps (B, C, H_l, W_l), fine to coarse -> (B, C, H_r, W_r)."""
        levels = self.gather(features)
        B, L, C = levels.shape[:3]
        union = levels.sum(dim=1)
        squeezed = self.channel_squeeze(union.mean(dim=(2, 3), keepdim=True))
        channel_weights = self.channel_logits(squeezed).view(B, L, C, 1, 1).softmax(dim=1)
        pooled = torch.cat((union.mean(dim=1, keepdim=True), union.amax(dim=1, keepdim=True)), dim=1)
        spatial_weights = self.spatial_logits(pooled).softmax(dim=1).unsqueeze(2)  # (B, L, 1, H, W)
        fused = (levels * channel_weights).sum(dim=1) + (levels * spatial_weights).sum(dim=1)
        refined = fused + self.context_transform(self.global_context(fused))
        return features[self.refine_level] + refined

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_levels={self.num_levels}, refine_level={self.refine_level}"
