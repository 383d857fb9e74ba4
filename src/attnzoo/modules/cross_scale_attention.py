"""TOPIQ's cross-scale attention: higher-level features query a lower-level feature map (top-down)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import check_int
from ..nn import Attention
from ..registry import ComponentInfo
from . import AttentionModule, register
from ._checks import check_tensor


class _CrossScaleLayer(nn.Module):
    """One pre-norm decoder layer without self-attention: x (B, N, dim) attends to context (B, M, dim)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, method: Any, config: dict[str, Any]):
        super().__init__()
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.attention = Attention(dim, num_heads, method=method, qkv_bias=True, **config)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm_query(x), self.norm_context(context))
        return x + self.mlp(self.norm_mlp(x))


@register
class CrossScaleAttention(AttentionModule):
    """Top-down cross-scale attention of TOPIQ / CFANet: high (B, dim, H, W), low (B, dim, H', W') -> (B, dim, H, W).

    Chen et al., "TOPIQ: A Top-down Approach from Semantics to Distortions for Image Quality
    Assessment" (arXiv 2308.03060). The tokens of the higher-level (semantic) map are the queries,
    the tokens of the lower-level (distortion) map the keys and values, so semantics choose which
    local regions to read: per layer ``x = x + Attn(LN(x), LN(low)); x = x + MLP(LN(x))``
    (pre-norm, GELU MLP of ``mlp_dim`` = min(4 dim, 2048) channels as in CFANet). CFANet chains one
    such block per pair of adjacent scales, coarsest first: ``f = csa_i(f, level_i)``.
    ``method`` (default "dense") and ``**config`` choose the attention (see :class:`attnzoo.nn.Attention`).

    Absent: the backbone, gated local pooling, the per-scale self-attention, position embeddings
    and the quality-score head of CFANet, and dropout.
    """

    info = ComponentInfo(
        name="CrossScaleAttention",
        title="TOPIQ: A Top-down Approach from Semantics to Distortions for Image Quality Assessment",
        arxiv="2308.03060", family=("module",),
        summary="top-down cross-scale attention: higher-level feature tokens query a lower-level feature map")

    def __init__(self, dim: int = 256, num_heads: int = 4, *, mlp_dim: int | None = None, num_layers: int = 1,
                 method: Any = "dense", **config: Any):
        super().__init__()
        self.dim = check_int("dim", dim)
        self.mlp_dim = min(4 * self.dim, 2048) if mlp_dim is None else check_int("mlp_dim", mlp_dim)
        self.layers = nn.ModuleList(_CrossScaleLayer(self.dim, num_heads, self.mlp_dim, method, config)
                                    for _ in range(check_int("num_layers", num_layers)))

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """high (B, dim, H, W) queries, low (B, dim, H', W') keys/values -> (B, dim, H, W)."""
        dtype = self.layers[0].norm_query.weight.dtype
        check_tensor("high", high, (None, self.dim, None, None), f"(batch, {self.dim}, height, width)", dtype)
        check_tensor("low", low, (high.shape[0], self.dim, None, None),
                     f"({high.shape[0]} (the batch of high), {self.dim}, height, width)", dtype)
        x = high.flatten(2).transpose(1, 2)
        context = low.flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer(x, context)
        return x.transpose(1, 2).reshape(high.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mlp_dim={self.mlp_dim}, num_layers={len(self.layers)}"
