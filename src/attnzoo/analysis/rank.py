"""``analysis.rank``: the rank analysis of RALA ("Breaking the Low-Rank Dilemma of Linear
Attention", Fan et al., CVPR 2025): linear attention's KV buffer sum_j phi(k_j) v_j^T (D x Dv per
head) has low rank next to softmax attention's output features softmax(q k^T) v (N x Dv per head).

Two ranks per matrix: the numerical rank (singular values above ``tol`` times the largest) and the
effective rank (Roy & Vetterli): exp of the entropy of the singular values normalised to sum 1,
between 1 and min(rows, cols).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError, check_float
from ..kernels.dense import attention_probabilities, causal_mask
from ..kernels.linear.feature_maps import fixed_map


def singular_values(m: torch.Tensor) -> torch.Tensor:
    """(..., min(R, C)) singular values of (..., R, C) matrices, float64, descending."""
    return torch.linalg.svdvals(m.double())


def numerical_rank(m: torch.Tensor, *, tol: float = 1e-6) -> torch.Tensor:
    """(...) number of singular values of (..., R, C) above ``tol`` times the largest."""
    s = singular_values(m)
    return (s > tol * s[..., :1]).sum(-1)


def effective_rank(m: torch.Tensor) -> torch.Tensor:
    """(...) exp(entropy of the normalised singular values) of (..., R, C) matrices; 0 for zero matrices."""
    s = singular_values(m)
    p = s / s.sum(-1, keepdim=True).clamp_min(1e-300)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return torch.where(s.sum(-1) > 0, torch.exp(entropy), torch.zeros_like(entropy))


@dataclass
class RankReport:
    """Ranks per batch item and head: ``kv_*`` (B, Hkv) of the KV buffers (D x Dv); ``output_*``
    (B, Hq) of softmax attention's outputs (N x Dv); ``bound``: min(D, Dv), the most either can have."""

    kv_numerical: torch.Tensor
    kv_effective: torch.Tensor
    output_numerical: torch.Tensor
    output_effective: torch.Tensor
    bound: int

    def summary(self) -> dict[str, float]:
        """Means over batch and heads."""
        return {name: float(getattr(self, name).double().mean()) for name in
                ("kv_numerical", "kv_effective", "output_numerical", "output_effective")}


def rank(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, feature_map: str = "elu",
         scale: float | None = None, tol: float = 1e-6) -> RankReport:
    """RALA's comparison on q (B, Hq, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv) (e.g. post-RoPE
    from :func:`~.record.record` with ``qkv=True``): ranks of the linear-attention KV buffer with
    ``feature_map`` (a name of :data:`attnzoo.kernels.linear.feature_maps.FIXED_MAPS`) against
    ranks of the softmax output (``causal`` pattern, ``scale`` default D^-1/2)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InvalidArgumentError(name, "a (B, H, N, D) tensor", getattr(t, "shape", type(t).__name__))
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise InvalidArgumentError("q, k, v", "(B, Hq, Nq, D), (B, Hkv, N, D), (B, Hkv, N, Dv) with Hkv dividing Hq",
                                   f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_float("tol", tol, low=0.0, high=1.0, low_open=True)
    phi = fixed_map(feature_map)
    kv = phi(k.double()).transpose(-1, -2) @ v.double()  # (B, Hkv, F, Dv)
    groups = q.shape[1] // k.shape[1]
    mask = causal_mask(q.shape[2], k.shape[2], q.device) if causal else None
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = attention_probabilities(q.double(), k.double(), scale=scale, mask=mask).double() @ v.double().repeat_interleave(groups, dim=1)
    return RankReport(kv_numerical=numerical_rank(kv, tol=tol), kv_effective=effective_rank(kv).float(),
                      output_numerical=numerical_rank(out, tol=tol), output_effective=effective_rank(out).float(),
                      bound=min(k.shape[-1], v.shape[-1]))
