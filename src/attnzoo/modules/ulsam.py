"""ULSAM: a spatial softmax attention map per channel subspace."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError, check_int
from ..registry import ComponentInfo
from . import AttentionModule, register
from ._checks import check_image


@register
class ULSAM(AttentionModule):
    """Ultra-lightweight subspace attention: x (B, C, H, W) -> (B, C, H, W).

    Jha et al., "ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional
    Neural Networks" (arXiv 2006.15102). The channels are split into ``num_subspaces`` groups
    F_n of C/g channels; each gets one attention map over the H*W positions,
    A_n = softmax(PW(maxpool_3x3(DW_1x1(F_n)))) with a depth-wise 1x1 convolution, a stride-1
    max-pool and a point-wise convolution to one channel, and the output is
    F_n * A_n + F_n, concatenated over n. ``normalization=True`` puts BatchNorm + ReLU after both
    convolutions as the authors' code does (the convolutions then have no bias: BatchNorm cancels
    it); ``False`` is the paper's equation alone, with biases. All
    subspaces run in one grouped convolution. Absent: the MobileNet backbones it is inserted in.
    """

    info = ComponentInfo(
        name="ULSAM",
        title="ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks",
        arxiv="2006.15102",
        family=("module",),
        summary="one spatial softmax map per channel subspace (depth-wise, max-pool, point-wise); x * A + x",
    )

    def __init__(self, channels: int, num_subspaces: int = 4, *, pool_size: int = 3, normalization: bool = True):
        super().__init__()
        self.channels = check_int("channels", channels)
        self.num_subspaces = check_int("num_subspaces", num_subspaces)
        if channels % num_subspaces:
            raise InvalidArgumentError("num_subspaces", f"a divisor of channels={channels}", num_subspaces)
        pool_size = check_int("pool_size", pool_size)
        if pool_size % 2 == 0:
            raise InvalidArgumentError("pool_size", "an odd integer (the map keeps its size)", pool_size)
        if not isinstance(normalization, bool):
            raise InvalidArgumentError("normalization", "a bool", repr(normalization))
        g = num_subspaces
        self.depthwise = nn.Conv2d(channels, channels, 1, groups=channels, bias=not normalization)
        self.pool = nn.MaxPool2d(pool_size, stride=1, padding=pool_size // 2)
        self.pointwise = nn.Conv2d(channels, g, 1, groups=g, bias=not normalization)  # one output channel per subspace
        self.depthwise_norm = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU()) if normalization else nn.Identity()
        self.pointwise_norm = nn.Sequential(nn.BatchNorm2d(g), nn.ReLU()) if normalization else nn.Identity()

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> the subspaces' attention maps (B, g, H, W), each summing to 1 over H, W."""
        check_image("x", x, self.channels)
        return self._maps(x)

    def _maps(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.pointwise_norm(self.pointwise(self.pool(self.depthwise_norm(self.depthwise(x)))))
        return logits.flatten(2).softmax(-1).view_as(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image("x", x, self.channels)
        B, C, H, W = x.shape
        subspaces = x.view(B, self.num_subspaces, C // self.num_subspaces, H, W)
        return (subspaces * (1 + self._maps(x).unsqueeze(2))).view(B, C, H, W)
