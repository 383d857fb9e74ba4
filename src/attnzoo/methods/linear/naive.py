"""Quadratic references of the linear methods, written from the papers' formulas: what their
``.reference`` computes. Each builds the (B, Hq, Nq, Nk) weight matrix W directly (feature maps,
masks, decays and normalisers written out here) and returns W v; none calls a method's
``features()`` or the linear executors, so a test of the fast path against ``.reference`` tests
the feature maps and weights, not only the executor. The only thing read from a method is its state
(a random projection). Queries align bottom-right with the keys when causal; outputs in q's dtype.
"""

from __future__ import annotations

import torch

FEATURE_MAPS = {  # phi of each fixed feature map
    "elu": lambda x: torch.where(x > 0, x + 1, torch.exp(x)),  # elu(x) + 1 (Katharopoulos et al.)
    "relu": lambda x: x.clamp(min=0),
    "squared_relu": lambda x: x.clamp(min=0) ** 2,
    "softmax": lambda x: torch.exp(x - x.amax(-1, keepdim=True)) / torch.exp(x - x.amax(-1, keepdim=True)).sum(-1, keepdim=True),
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "identity": lambda x: x,
}


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, N, E) -> (B, heads, N, E): query head h reads key/value head h // (heads / Hkv)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def visible(len_q: int, len_kv: int, causal: bool, device=None) -> torch.Tensor:
    """(Nq, Nk) bool: key j is visible to query i (causal: j <= i + Nk - Nq)."""
    i = torch.arange(len_q, device=device)[:, None] + (len_kv - len_q)
    j = torch.arange(len_kv, device=device)[None, :]
    return (j <= i) if causal else torch.ones(len_q, len_kv, dtype=torch.bool, device=device)


def _apply(weights: torch.Tensor, v: torch.Tensor, q: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    """W v with W (B, Hq, Nq, Nk), each row divided by its sum + ``eps`` when ``normalize`` (a row
    that sees no key stays zeros)."""
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + eps).clamp(min=torch.finfo(weights.dtype).tiny)
    return (weights @ _heads(v, q.shape[1]).to(weights.dtype)).to(q.dtype)


def kernelized_reference(q, k, v, *, feature_map: str, causal: bool, eps: float, normalize: bool = True,
                         decay: torch.Tensor | None = None) -> torch.Tensor:
    """``W_ij = phi(q_i) . phi(k_j) lambda_h^(i - j)`` on the visible keys (``decay`` (Hq,)
    lambda_h, None: 1), rows divided by their sum + ``eps`` when ``normalize`` (Katharopoulos et
    al., arXiv 2006.16236, Eq. 4-6; unnormalised with decay: Lightning Attention, arXiv 2405.17381)."""
    phi = FEATURE_MAPS[feature_map]
    nq, nk = q.shape[2], k.shape[2]
    weights = (phi(q) @ phi(_heads(k, q.shape[1])).transpose(-1, -2)) * visible(nq, nk, causal, q.device)
    if decay is not None:
        gap = (torch.arange(nq, device=q.device)[:, None] + nk - nq - torch.arange(nk, device=q.device)[None, :]).clamp(min=0)
        weights = weights * decay.to(q.device, weights.dtype)[:, None, None] ** gap
    return _apply(weights, v, q, normalize, eps)


def lightning_decay(decay, heads: int) -> torch.Tensor | None:
    """(Hq,) lambda_h of a ``lightning`` decay setting: TransNormerLLM's ALiBi rates
    exp(-2^(-8 h / H)) for h = 1 .. H, the given factors, or None."""
    if decay is None:
        return None
    if decay == "alibi":
        return torch.exp(-(2.0 ** (-8.0 * torch.arange(1, heads + 1, dtype=torch.float64) / heads)))
    return torch.tensor(decay if isinstance(decay, tuple) else [decay] * heads, dtype=torch.float64)


def performer_reference(q, k, v, *, proj: torch.Tensor, scale: float, causal: bool, eps: float) -> torch.Tensor:
    """FAVOR+ (arXiv 2009.14794, Lemma 1): ``W_ij = phi(q_i) . phi(k_j)`` normalised over the
    visible keys, ``phi(x) = exp(w x' - |x'|^2 / 2) / sqrt(M)`` of x' = x scale^(1/2) with the
    method's projection ``proj`` (M, D); no stabilisers (float64 inside)."""

    def phi(x):
        x = x.double() * scale ** 0.5
        return torch.exp(x @ proj.double().to(x.device).T - (x * x).sum(-1, keepdim=True) / 2) / proj.shape[0] ** 0.5

    weights = (phi(q) @ phi(_heads(k, q.shape[1])).transpose(-1, -2)) * visible(q.shape[2], k.shape[2], causal, q.device)
    return _apply(weights, v, q, True, eps)


def rala_reference(q, k, v, *, feature_map: str, scale: float, eps: float) -> torch.Tensor:
    """RALA (arXiv 2411.07635, Eq. 10-11): ``W_ij = phi(q_i) . alpha_j phi(k_j)`` normalised, with
    ``alpha_j = Nk softmax_j(scale mean_i phi(q_i) . phi(k_j))`` on the features. Non-causal."""
    phi = FEATURE_MAPS[feature_map]
    qf, kf = phi(q), phi(_heads(k, q.shape[1]))
    alpha = k.shape[2] * torch.softmax(scale * qf.mean(2, keepdim=True) @ kf.transpose(-1, -2), dim=-1)  # (B, Hq, 1, Nk)
    return _apply((qf @ kf.transpose(-1, -2)) * alpha, v, q, True, eps)


def inline_reference(q, k, v, *, feature_map: str, window: int, scale: float, causal: bool) -> torch.Tensor:
    """InLine attention (arXiv 2412.06590, Eq. 5 with the official scale / n factor):
    ``W_ij = (phi(q_i) . phi(k_j) - mean_s phi(q_i) . phi(k_s)) scale / n + 1 / n`` over the n
    keys query i sees, plus softmax attention over the ``window`` nearest keys (the last ``window``
    when causal, centred otherwise) when ``window`` > 0."""
    phi = FEATURE_MAPS[feature_map]
    nq, nk = q.shape[2], k.shape[2]
    keys, values = _heads(k, q.shape[1]), _heads(v, q.shape[1])
    seen = visible(nq, nk, causal, q.device)
    n = seen.sum(-1, keepdim=True).clamp(min=1).to(q.dtype)
    scores = (phi(q) @ phi(keys).transpose(-1, -2)) * seen
    out = (((scores - scores.sum(-1, keepdim=True) / n) * (scale / n) + 1 / n) * seen) @ values.to(q.dtype)
    if window:
        before = torch.arange(nq, device=q.device)[:, None] + nk - nq - torch.arange(nk, device=q.device)[None, :]
        left = window - 1 if causal else (window - 1) // 2
        near = (before <= left) & (before >= -(window - 1 - left))
        logits = ((q @ keys.transpose(-1, -2)) * scale).masked_fill(~near, float("-inf"))
        out = out + torch.softmax(logits, dim=-1).nan_to_num(0.0) @ values.to(q.dtype)  # no near key: zeros
    return out.to(q.dtype)
