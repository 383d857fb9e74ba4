"""Feature maps phi of linear attention: fixed ones by name, FAVOR+ random features, learnable
MLP kernels (Hedgehog, LinFusion) with a fit to a softmax teacher, and LRPE position features.

Every map takes (B, H, N, D) and returns (B, H, N, F); learnable ones are ``nn.Module`` objects
holding one parameter set per head (or one shared by all heads).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InvalidArgumentError, UnknownNameError, check_int
from ..dense import causal_mask, masked_softmax, work_dtype

FIXED_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu": lambda x: F.elu(x).add_(1),  # Katharopoulos et al.: elu(x) + 1 > 0
    "relu": F.relu,
    "squared_relu": lambda x: F.relu(x) ** 2,
    "softmax": lambda x: torch.softmax(x, dim=-1),  # over the head dimension (Efficient Attention)
    "silu": F.silu,  # TransNormerLLM's swish
    "identity": lambda x: x,
}


def fixed_map(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The feature map registered as ``name`` (see :data:`FIXED_MAPS`)."""
    if name not in FIXED_MAPS:
        raise UnknownNameError("feature map", str(name), FIXED_MAPS)
    return FIXED_MAPS[name]


def orthogonal_gaussian(num_features: int, dim: int, *, seed: int, heads: int = 1) -> torch.Tensor:
    """(heads, M, D) FAVOR+ projections: blocks of D orthogonal rows (QR of a Gaussian matrix),
    each row rescaled to the norm of an independent D-dim Gaussian vector (Choromanski et al.)."""
    gen = torch.Generator().manual_seed(seed)
    mats = []
    for _ in range(heads):
        blocks = [torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0].T
                  for _ in range(-(-num_features // dim))]
        rows = torch.cat(blocks)[:num_features]
        norms = torch.randn(num_features, dim, generator=gen, dtype=torch.float64).norm(dim=-1, keepdim=True)
        mats.append(rows * norms)
    return torch.stack(mats).float()


def favor_exponent(x: torch.Tensor, proj: torch.Tensor, *, is_query: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(exponent, stabiliser) of the FAVOR+ features of x (B, H, N, D), already scaled by
    ``scale ** 0.5``; proj (H|1, M, D): ``exponent = w x - |x|^2 / 2``, the stabiliser c is a
    per-query max (queries) or a per-head max over all keys (keys), detached."""
    work = work_dtype(x)
    x = x.to(work)
    wx = x @ proj.to(x.device, work).transpose(-1, -2)
    exponent = wx - 0.5 * (x * x).sum(-1, keepdim=True)
    stab = wx.amax(-1, keepdim=True) if is_query else wx.amax(dim=(-2, -1), keepdim=True)
    return exponent, stab.detach()


def favor_features(x: torch.Tensor, proj: torch.Tensor, *, is_query: bool) -> torch.Tensor:
    """Positive random features ``exp(w x - |x|^2 / 2 - c) / sqrt(M)`` (see :func:`favor_exponent`),
    so that ``E[phi(q) phi(k)] = exp(q k - c_q - c_k)``; the stabilisers cancel in normalised attention."""
    exponent, stab = favor_exponent(x, proj, is_query=is_query)
    return torch.exp(exponent - stab) / math.sqrt(proj.shape[-2])


def lrpe(x: torch.Tensor, theta: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """LRPE (TransNormer): (B, H, N, F) -> (B, H, N, 2F) ``[x cos(theta p), x sin(theta p)]``, so
    that ``lrpe(q)_s . lrpe(k)_t = sum_d q_d k_d cos(theta_d (s - t))``; theta (F,) or (H, F)."""
    angle = positions.to(x.device, torch.float32)[:, None] * theta.to(x.device, torch.float32).unsqueeze(-2)
    return torch.cat([x * torch.cos(angle).to(x.dtype), x * torch.sin(angle).to(x.dtype)], dim=-1)


def lrpe_theta(dim: int, base: float = 10000.0) -> torch.Tensor:
    """TransNormerLLM's initial LRPE angles ``base^(-2i/d)``."""
    return base ** (-2 * torch.arange(dim, dtype=torch.float32) / dim)


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


def linear_weights(qf: torch.Tensor, kf: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Normalised linear-attention weights (B, H, Nq, Nk) from features (same heads)."""
    scores = qf @ kf.transpose(-1, -2)
    if mask is not None:
        scores = scores * mask
    return scores / scores.sum(-1, keepdim=True).clamp_min(1e-12)


def fit_to_softmax(feature_map: nn.Module, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True,
                   scale: float | None = None, steps: int = 200, lr: float = 1e-2, window: int = 256,
                   windows_per_step: int = 4, seed: int = 0) -> list[float]:
    """Train ``feature_map`` (``(q, k) -> (phi(q), phi(k))``) so that its normalised linear
    attention weights match the teacher's ``softmax(q k^T * scale)`` (Hedgehog's distillation:
    soft-label cross-entropy over keys, averaged over queries). q, k (B, H, N, D) are samples of one
    layer's queries and keys (same heads; expand GQA keys first), cut into windows of ``window``
    tokens (each window its own sequence, so a step costs O(window^2)); every step trains on
    ``windows_per_step`` windows drawn at random (``seed``). Returns the loss per step."""
    if q.shape != k.shape:
        raise InvalidArgumentError("k", f"the shape of q {tuple(q.shape)} (expand GQA heads first)", tuple(k.shape))
    steps, window = check_int("steps", steps), check_int("window", window)
    windows_per_step = check_int("windows_per_step", windows_per_step)
    window = min(window, q.shape[2])
    cut = lambda x: x.detach().float()[:, :, : x.shape[2] // window * window].unflatten(2, (-1, window)).transpose(1, 2).flatten(0, 1)  # noqa: E731
    q, k = cut(q), cut(k)  # (B * N / window, H, window, D)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = causal_mask(window, window, q.device) if causal else None
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(feature_map.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        pick = torch.randperm(q.shape[0], generator=gen)[:windows_per_step].to(q.device)
        qs, ks = q[pick], k[pick]
        teacher = masked_softmax((qs @ ks.transpose(-1, -2)) * scale, mask)
        qf, kf = feature_map(qs, ks)
        student = linear_weights(qf, kf, None if mask is None else mask.float())
        loss = -(teacher * torch.log(student.clamp_min(1e-12))).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
