"""HorNet's recursive gated convolution (g^n Conv)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError, check_float, check_int
from ..registry import ComponentInfo
from . import AttentionModule, register
from ._checks import check_image


@register
class GnConv(AttentionModule):
    """Recursive gated convolution of order n: x (B, C, H, W) -> (B, C, H, W).

    Rao et al., "HorNet: Efficient High-Order Spatial Interactions with Recursive Gated
    Convolutions" (arXiv 2207.14284). Channel widths C_k = C / 2^(n-1-k), k = 0..n-1. A 1x1
    projection gives p_0 (C_0 channels) and q_0..q_{n-1} (sum C_k channels); one depth-wise
    KxK convolution of the q's, times ``scale``, gives the gates; then p_{k+1} = g_k(p_k) *
    DW(q)_k, with g_0 the identity and g_k 1x1 convolutions C_{k-1} -> C_k, and a 1x1 output
    projection of p_n. Each order adds one multiplicative (spatial) interaction. Defaults are
    HorNet's: 7x7 depth-wise kernel, scale 1/3. Absent: the global filter (GF) variant of the
    depth-wise convolution, and the HorNet blocks and stages around it.
    """

    info = ComponentInfo(
        name="GnConv",
        title="HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions",
        arxiv="2207.14284",
        family=("module",),
        summary="recursive gated convolution: n nested element-wise gates from one depth-wise conv, widths doubling",
    )

    def __init__(self, channels: int, order: int = 3, *, kernel_size: int = 7, scale: float = 1.0 / 3.0):
        super().__init__()
        self.channels = check_int("channels", channels)
        self.order = check_int("order", order)
        if channels % 2 ** (order - 1):
            raise InvalidArgumentError("channels", f"a multiple of 2^(order-1) = {2 ** (order - 1)} (order={order})", channels)
        kernel_size = check_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise InvalidArgumentError("kernel_size", "an odd integer (the map keeps its size)", kernel_size)
        self.scale = check_float("scale", scale, low=0.0, high=float("inf"), low_open=True)
        self.widths = [channels // 2 ** (order - 1 - k) for k in range(order)]
        gates = sum(self.widths)
        self.project_in = nn.Conv2d(channels, self.widths[0] + gates, 1)
        self.depthwise = nn.Conv2d(gates, gates, kernel_size, padding=kernel_size // 2, groups=gates)
        self.widen = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip(self.widths, self.widths[1:]))
        self.project_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image("x", x, self.channels)
        p, q = self.project_in(x).split([self.widths[0], sum(self.widths)], dim=1)
        gates = (self.depthwise(q) * self.scale).split(self.widths, dim=1)
        p = p * gates[0]
        for widen, gate in zip(self.widen, gates[1:]):
            p = widen(p) * gate
        return self.project_out(p)
