"""Quadratic references of the linear executors: the same math written with the full N x N matrix.

``A = (phi(Q) phi(K)^T) * M`` where ``M`` is the (decayed) causal mask, ``M_ij = lambda_h^(p_i - j)``
for keys ``j <= p_i`` (query i at position ``p_i = i + Nk - Nq``, bottom-right aligned) and 0
elsewhere; without ``causal`` ``M`` is all ones. The product is ``A V``; the normalised form divides
each row by ``A 1 + eps`` (Katharopoulos et al.; a zero normaliser counts as 1). Computed in float32 (float64 stays float64).
"""

from __future__ import annotations

import torch

from ..dense import repeat_kv, work_dtype


def decay_matrix(len_q: int, len_kv: int, decay: torch.Tensor | None, *, causal: bool, device) -> torch.Tensor | None:
    """(H|1, Nq, Nk) weights ``M``: causal mask times ``decay^(p_i - j)``; None when all ones."""
    if not causal:
        return None
    dist = (torch.arange(len_q, device=device)[:, None] + (len_kv - len_q) - torch.arange(len_kv, device=device)[None, :])
    allowed = dist >= 0
    if decay is None:
        return allowed[None].float()
    log_decay = torch.log(decay.double().to(device))[:, None, None]
    return torch.where(allowed, torch.exp(dist.clamp(min=0).double() * log_decay), 0.0)


def naive_linear_attention(qf, kf, v, *, causal: bool, decay: torch.Tensor | None = None, normalize: bool = True,
                           eps: float = 1e-6) -> torch.Tensor:
    """qf (B, H, Nq, F), kf (B, Hk, Nk, F), v (B, Hk, Nk, Dv), decay (H,) or None -> (B, H, Nq, Dv)
    in the work dtype."""
    work = work_dtype(qf)
    groups = qf.shape[1] // kf.shape[1]
    kf, v = repeat_kv(kf, groups).to(work), repeat_kv(v, groups).to(work)
    scores = qf.to(work) @ kf.transpose(-1, -2)
    weights = decay_matrix(qf.shape[2], kf.shape[2], decay, causal=causal, device=qf.device)
    if weights is not None:
        scores = scores * weights.to(work)
    out = scores @ v
    if normalize:
        out = out / safe_denominator(scores.sum(-1, keepdim=True), eps)
    return out


def safe_denominator(den: torch.Tensor, eps: float) -> torch.Tensor:
    """``den + eps``, with exact zeros (rows that see nothing, or underflow) replaced by 1."""
    den = den + eps
    return torch.where(den == 0, torch.ones_like(den), den)
