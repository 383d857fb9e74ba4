"""Learnable feature maps of linear attention: ``nn.Module`` objects (B, H, N, D) -> (B, H, N, F)
holding one parameter set per head (Hedgehog's spiky softmax MLP, LinFusion's kernel MLP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InvalidArgumentError, check_int


class _PerHeadLinear(nn.Module):
    """x (B, H, N, D) -> x W_h + b_h, one (D, F) matrix per head (or one for all heads)."""

    def __init__(self, heads: int, dim: int, features: int, *, identity: bool):
        super().__init__()
        weight = torch.eye(dim, features) if identity else torch.zeros(dim, features)
        self.weight = nn.Parameter(weight.repeat(heads, 1, 1))
        self.bias = nn.Parameter(torch.zeros(heads, 1, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.weight.shape[0] and self.weight.shape[0] != 1:
            raise InvalidArgumentError("feature map heads", f"{self.weight.shape[0]} heads (or 1, shared)", f"input with {x.shape[1]} heads")
        if x.shape[-1] != self.weight.shape[1]:
            raise InvalidArgumentError("feature map dim", f"head_dim {self.weight.shape[1]}", f"input with head_dim {x.shape[-1]}")
        w = self.weight.to(x.dtype)
        return x @ w + self.bias.to(x.dtype)


class HedgehogFeatureMap(nn.Module):
    """Hedgehog's learnable feature map (Zhang et al., arXiv 2402.04347), one per layer:
    ``phi(x) = [softmax(x W + b), softmax(-(x W + b))]`` over the F features, spiky and monotone
    like ``exp``; separate (W, b) for queries and keys and per head. Initialised at W = I (F = D)."""

    def __init__(self, heads: int, dim: int, features: int | None = None):
        super().__init__()
        heads, dim = check_int("heads", heads), check_int("dim", dim)
        features = dim if features is None else check_int("features", features)
        self.query = _PerHeadLinear(heads, dim, features, identity=True)
        self.key = _PerHeadLinear(heads, dim, features, identity=True)

    @staticmethod
    def _map(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.softmax(x, dim=-1), torch.softmax(-x, dim=-1)], dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._map(self.query(q)), self._map(self.key(k))


class KernelMLP(nn.Module):
    """LinFusion-style learnable kernel (Liu et al., arXiv 2409.02097), one per layer:
    ``phi(x) = elu(x + MLP(x)) + 1`` with a per-head two-layer MLP whose output layer starts at
    zero, so an untrained map is elu + 1; separate MLPs for queries and keys."""

    def __init__(self, heads: int, dim: int, hidden: int | None = None):
        super().__init__()
        heads, dim = check_int("heads", heads), check_int("dim", dim)
        hidden = dim if hidden is None else check_int("hidden", hidden)
        self.query = nn.ModuleList([_PerHeadLinear(heads, dim, hidden, identity=True), _PerHeadLinear(heads, hidden, dim, identity=False)])
        self.key = nn.ModuleList([_PerHeadLinear(heads, dim, hidden, identity=True), _PerHeadLinear(heads, hidden, dim, identity=False)])

    @staticmethod
    def _map(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x + layers[1](F.gelu(layers[0](x)))) + 1

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._map(self.query, q), self._map(self.key, k)
