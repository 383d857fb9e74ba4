"""Fixed feature maps phi of linear attention: by name, FAVOR+ random features, and LRPE position
features. Every map takes (B, H, N, D) and returns (B, H, N, F); the learnable maps live with
the learned methods (:mod:`attnzoo.methods.learned.maps`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ...errors import UnknownNameError
from ..dense import work_dtype

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
    work = work_dtype(x)  # float32 angles (float64 for float64 inputs)
    angle = positions.to(x.device, work)[:, None] * theta.to(x.device, work).unsqueeze(-2)
    return torch.cat([x * torch.cos(angle).to(x.dtype), x * torch.sin(angle).to(x.dtype)], dim=-1)


def lrpe_theta(dim: int, base: float = 10000.0, heads: int = 1) -> torch.Tensor:
    """TransNormerLLM's initial LRPE angles, split across heads: (heads, dim) float64, head h taking
    ``base^(-2 (h dim + i) / (heads dim))``, i < dim (one head: ``base^(-2i/dim)``)."""
    index = torch.arange(heads * dim, dtype=torch.float64).view(heads, dim)
    return base ** (-2 * index / (heads * dim))
