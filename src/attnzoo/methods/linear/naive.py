"""Quadratic references of the linear methods, written from the papers' formulas: what their
``.reference`` computes. Each builds the (B, Hq, Nq, Nk) weight matrix W directly (feature maps,
masks, decays and normalisers written out here) and returns W v; none calls a method's
``features()`` or the linear executors, so a test of the fast path against ``.reference`` tests
the feature maps and weights, not only the executor. The only thing read from a method is its state
(a random projection or rotation). Queries align bottom-right with the keys when causal; outputs in q's dtype.
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


def expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, N, E) -> (B, heads, N, E): query head h reads key/value head h // (heads / Hkv)
    (every naive module's grouped-query expansion)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def distance(len_q: int, len_kv: int, device=None) -> torch.Tensor:
    """(Nq, Nk) float64 ``i + Nk - Nq - j``: how far key j lies before query i (queries aligned
    bottom-right with the keys)."""
    i = torch.arange(len_q, device=device, dtype=torch.float64)[:, None] + (len_kv - len_q)
    return i - torch.arange(len_kv, device=device, dtype=torch.float64)[None, :]


def visible(len_q: int, len_kv: int, causal: bool, device=None) -> torch.Tensor:
    """(Nq, Nk) bool: key j is visible to query i (causal: j <= i + Nk - Nq)."""
    return distance(len_q, len_kv, device) >= 0 if causal else torch.ones(len_q, len_kv, dtype=torch.bool, device=device)


def _apply(weights: torch.Tensor, v: torch.Tensor, q: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    """W v with W (B, Hq, Nq, Nk), each row divided by its sum + ``eps`` when ``normalize`` (a row
    that sees no key stays zeros)."""
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + eps).clamp(min=torch.finfo(weights.dtype).tiny)
    return (weights @ expand_heads(v, q.shape[1]).to(weights.dtype)).to(q.dtype)


def kernelized_reference(q, k, v, *, feature_map: str, causal: bool, eps: float, normalize: bool = True,
                         decay: torch.Tensor | None = None) -> torch.Tensor:
    """``W_ij = phi(q_i) . phi(k_j) lambda_h^(i - j)`` on the visible keys (``decay`` (Hq,)
    lambda_h, None: 1), rows divided by their sum + ``eps`` when ``normalize`` (Katharopoulos et
    al., arXiv 2006.16236, Eq. 4-6; unnormalised with decay: Lightning Attention, arXiv 2405.17381)."""
    phi = FEATURE_MAPS[feature_map]
    nq, nk = q.shape[2], k.shape[2]
    weights = (phi(q) @ phi(expand_heads(k, q.shape[1])).transpose(-1, -2)) * visible(nq, nk, causal, q.device)
    if decay is not None:
        weights = weights * (decay.to(q.device)[:, None, None] ** distance(nq, nk, q.device).clamp(min=0)).to(weights.dtype)
    return _apply(weights, v, q, normalize, eps)


def lightning_decay(decay, heads: int, layer: int | None = None, num_layers: int | None = None) -> torch.Tensor | None:
    """(Hq,) float64 lambda_h of a ``decay`` setting: TransNormerLLM's ALiBi rates
    exp(-2^(-8 h / H) s) for h = 1 .. H, with s = 1 - l / (L - 1) + 1e-5 for layer l of L (0-based;
    s = 1 when ``layer`` is None), the given factors, or None."""
    if decay is None:
        return None
    if decay == "alibi":
        depth = 1.0 if layer is None else 1.0 - layer / (num_layers - 1) + 1e-5
        return torch.exp(-(2.0 ** (-8.0 * torch.arange(1, heads + 1, dtype=torch.float64) / heads)) * depth)
    return torch.tensor(decay if isinstance(decay, tuple) else [decay] * heads, dtype=torch.float64)


def positive_random_features(x: torch.Tensor, proj: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Performer's positive random features exp(w . x' - |x'|^2 / 2) / sqrt(M) of x' = x scale^0.5,
    x (..., N, D), proj (M, D) -> (..., N, M) (FAVOR+, arXiv 2009.14794, Lemma 1); no stabilisers."""
    x = x * scale ** 0.5
    return torch.exp(x @ proj.to(x).transpose(-1, -2) - (x * x).sum(-1, keepdim=True) / 2) / proj.shape[-2] ** 0.5


def performer_reference(q, k, v, *, proj: torch.Tensor, scale: float, causal: bool, eps: float) -> torch.Tensor:
    """FAVOR+ (arXiv 2009.14794, Lemma 1): ``W_ij = phi(q_i) . phi(k_j)`` normalised over the
    visible keys, phi the :func:`positive_random_features` of the method's projection ``proj``
    (M, D) (float64 inside)."""
    phi = lambda x: positive_random_features(x.double(), proj.double().to(x.device), scale)  # noqa: E731
    weights = (phi(q) @ phi(expand_heads(k, q.shape[1])).transpose(-1, -2)) * visible(q.shape[2], k.shape[2], causal, q.device)
    return _apply(weights, v, q, True, eps)


def rala_reference(q, k, v, *, feature_map: str, scale: float, eps: float) -> torch.Tensor:
    """RALA (arXiv 2411.07635, Eq. 10-11): ``W_ij = phi(q_i) . alpha_j phi(k_j)`` normalised, with
    ``alpha_j = Nk softmax_j(scale mean_i phi(q_i) . phi(k_j))`` on the features. Non-causal."""
    phi = FEATURE_MAPS[feature_map]
    qf, kf = phi(q), phi(expand_heads(k, q.shape[1]))
    alpha = k.shape[2] * torch.softmax(scale * qf.mean(2, keepdim=True) @ kf.transpose(-1, -2), dim=-1)  # (B, Hq, 1, Nk)
    return _apply((qf @ kf.transpose(-1, -2)) * alpha, v, q, True, eps)


def inline_reference(q, k, v, *, feature_map: str, window: int, scale: float, causal: bool) -> torch.Tensor:
    """InLine attention (arXiv 2412.06590, Eq. 5 with the official scale / n factor):
    ``W_ij = (phi(q_i) . phi(k_j) - mean_s phi(q_i) . phi(k_s)) scale / n + 1 / n`` over the n
    keys query i sees, plus softmax attention over the ``window`` nearest keys (the last ``window``
    when causal, centred otherwise) when ``window`` > 0."""
    phi = FEATURE_MAPS[feature_map]
    nq, nk = q.shape[2], k.shape[2]
    keys, values = expand_heads(k, q.shape[1]), expand_heads(v, q.shape[1])
    seen = visible(nq, nk, causal, q.device)
    n = seen.sum(-1, keepdim=True).clamp(min=1).to(q.dtype)
    scores = (phi(q) @ phi(keys).transpose(-1, -2)) * seen
    out = (((scores - scores.sum(-1, keepdim=True) / n) * (scale / n) + 1 / n) * seen) @ values.to(q.dtype)
    if window:
        before = distance(nq, nk, q.device)
        left = window - 1 if causal else (window - 1) // 2
        near = (before <= left) & (before >= -(window - 1 - left))
        logits = ((q @ keys.transpose(-1, -2)) * scale).masked_fill(~near, float("-inf"))
        out = out + torch.softmax(logits, dim=-1).nan_to_num(0.0) @ values.to(q.dtype)  # no near key: zeros
    return out.to(q.dtype)


def transnormer_reference(q, k, v, *, feature_map: str, causal: bool, eps: float, lrpe_base: float | None,
                          decay: torch.Tensor | None) -> torch.Tensor:
    """TransNormerLLM's NormAttention (arXiv 2307.14995, Sec. 3.1-3.2): ``W_ij = sum_d phi(q_i)_d
    phi(k_j)_d cos(theta_hd (i - j)) lambda_h^(i - j)`` on the visible keys, LRPE angles split
    across heads ``theta_hd = base^(-2 (h D + d) / (H D))`` (``lrpe_base`` None: no LRPE), ``decay``
    (Hq,) lambda_h or None; no normaliser: ``O = W V`` divided per token by the RMS of its H Dv
    channels over all heads, + ``eps`` inside the root (SRMSNorm without gain)."""
    phi = FEATURE_MAPS[feature_map]
    heads, dim, nq, nk = q.shape[1], q.shape[-1], q.shape[2], k.shape[2]
    qf, kf = phi(q), phi(expand_heads(k, heads))
    gap = distance(nq, nk, q.device)
    if lrpe_base is None:
        weights = qf @ kf.transpose(-1, -2)
    else:
        theta = lrpe_base ** (-2 * torch.arange(heads * dim, dtype=torch.float64, device=q.device).view(heads, 1, 1, dim) / (heads * dim))
        weights = torch.einsum("bhid,bhjd,hijd->bhij", qf, kf, torch.cos(theta * gap[..., None]).to(qf.dtype))
    weights = weights * visible(nq, nk, causal, q.device)
    if decay is not None:
        weights = weights * (decay.to(q.device)[:, None, None] ** gap.clamp(min=0)).to(weights.dtype)
    out = weights @ expand_heads(v, heads).to(weights.dtype)
    return (out / torch.sqrt((out * out).mean(dim=(1, 3), keepdim=True) + eps)).to(q.dtype)


def block_diagonal_reference(q, k, v, *, block_size: int, causal: bool, scale: float) -> torch.Tensor:
    """TransNormer's DiagAttention (arXiv 2210.10340, Sec. 4.2): softmax attention of each query over
    the keys of its own block of ``block_size`` tokens (the earlier ones when causal). Self-attention."""
    heads, n = q.shape[1], q.shape[2]
    block = torch.arange(n, device=q.device) // block_size
    allowed = (block[:, None] == block[None, :]) & visible(n, n, causal, q.device)
    logits = ((q @ expand_heads(k, heads).transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
    return (torch.softmax(logits, dim=-1) @ expand_heads(v, heads).to(q.dtype)).to(q.dtype)


def lsh_chunks(x: torch.Tensor, rotation: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reformer-style angular LSH of x (B, H, N, D) with ``rotation`` (D, R): per token its bucket,
    the argmax of ``[x R, -x R]`` (R = 0: one bucket), and the chunk of ``chunk`` tokens it falls in
    once the tokens are sorted by (bucket, position); each (B, H, N) long."""
    B, H, n, _ = x.shape
    if rotation.shape[1]:
        turned = x.detach().to(rotation.dtype) @ rotation.to(x.device)
        bucket = torch.cat([turned, -turned], dim=-1).argmax(-1)
    else:
        bucket = torch.zeros(B, H, n, dtype=torch.long, device=x.device)
    chunks = torch.empty_like(bucket)
    for b in range(B):
        for h in range(H):
            order = sorted(range(n), key=lambda i: (int(bucket[b, h, i]), i))
            for rank, i in enumerate(order):
                chunks[b, h, i] = rank // chunk
    return bucket, chunks


def scatterbrain_reference(q, k, v, *, proj: torch.Tensor, rotation: torch.Tensor, bucket_chunk: int, scale: float,
                           causal: bool, eps: float) -> torch.Tensor:
    """Scatterbrain (arXiv 2110.15343, Sec. 3, Eq. 2): ``W = phi(Q) phi(K)^T + S``, the low-rank
    Performer estimate (:func:`positive_random_features` of ``proj`` (M, D)) plus the sparse
    correction ``S_ij = exp(q_i . k_j scale) - phi(q_i) . phi(k_j)`` on the LSH set (query and key
    share bucket and sorted chunk, :func:`lsh_chunks` with ``rotation``), so the set is exact and the
    overlap counted once; rows over the visible keys normalised by ``W 1`` + ``eps``. Self-attention,
    float64 inside."""
    heads = q.shape[1]
    keys = expand_heads(k, heads)
    (bq, cq), (bk, ck) = lsh_chunks(q, rotation, bucket_chunk), lsh_chunks(keys, rotation, bucket_chunk)
    in_set = (bq[..., :, None] == bk[..., None, :]) & (cq[..., :, None] == ck[..., None, :])
    phi = lambda x: positive_random_features(x.double(), proj.double().to(x.device), scale)  # noqa: E731
    low_rank = phi(q) @ phi(keys).transpose(-1, -2)
    sparse = torch.where(in_set, torch.exp((q.double() @ keys.double().transpose(-1, -2)) * scale) - low_rank, 0.0)
    return _apply((low_rank + sparse) * visible(q.shape[2], k.shape[2], causal, q.device), v, q, True, eps)
