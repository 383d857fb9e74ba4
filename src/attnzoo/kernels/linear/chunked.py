"""The shared linear-attention executors (PyTorch): non-causal in one pass, causal in chunks.

Causal form (Lightning Attention-2 / flash-linear-attention "chunk" form): tokens are cut into
chunks of ``chunk``; inside a chunk the (decayed) causal product ``(q k^T * M) v`` is computed
quadratically, across chunks a ``F x Dv`` state ``S`` carries ``sum_j lambda^(p - j) k_j^T v_j``.
Chunks are processed a segment (``segment`` tokens) at a time: within a segment the states before
each chunk come from a prefix sum over the segment's chunks (no decay) or one small (chunks x
chunks) matrix product (decay), never a cumulative sum over N x F x Dv, so temporaries stay
O(segment) and memory is O(N (F + Dv)) overall. Query heads that share a key head (GQA) share
the state, stacked as extra rows of each chunk. Everything
accumulates in float32 (float64 stays float64). The decay factors are powers ``lambda^e`` with
``e >= 0`` only, so nothing overflows however long the sequence; normalisers grow at most like N.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from ...errors import InvalidArgumentError
from ..dense import repeat_kv
from .naive import safe_denominator, work_dtype

BACKENDS = ("auto", "torch", "triton")


def _check_decay(decay: torch.Tensor | None, heads: int) -> None:
    if decay is None:
        return
    if decay.shape != (heads,) or not bool(((decay > 0) & (decay <= 1)).all()):
        raise InvalidArgumentError("decay", f"a tensor of {heads} per-head factors in (0, 1]", decay)


def linear_attention(qf, kf, v, *, causal: bool, decay: torch.Tensor | None = None, normalize: bool = True,
                     eps: float = 1e-6, chunk: int = 64, segment: int = 16384, backend: str = "auto") -> torch.Tensor:
    """Linear attention with feature maps already applied.

    qf (B, H, Nq, F), kf (B, Hk, Nk, F), v (B, Hk, Nk, Dv), H a multiple of Hk; ``decay`` (H,) in
    (0, 1] or None. Returns ``(phi(Q) phi(K)^T * M) V`` (B, H, Nq, Dv) in the work dtype, divided
    row-wise by ``(phi(Q) phi(K)^T * M) 1 + eps`` when ``normalize`` (the normaliser rides along as
    an extra value column of ones). Causal masks are bottom-right aligned; see :mod:`.naive`.
    """
    _check_decay(decay, qf.shape[1])
    out = state_product(qf, kf, v, causal=causal, decay=decay, chunk=chunk, segment=segment, backend=backend,
                        append_ones=normalize)
    if normalize:
        out = out[..., :-1] / safe_denominator(out[..., -1:], eps)
    return out


def state_product(qf, kf, v, *, causal: bool, decay: torch.Tensor | None = None, chunk: int = 64,
                  segment: int = 16384, backend: str = "auto", append_ones: bool = False) -> torch.Tensor:
    """The unnormalised product ``(phi(Q) phi(K)^T * M) V`` (shapes as :func:`linear_attention`);
    ``append_ones`` adds a column of ones to V (its output is the normaliser ``(phi(Q) phi(K)^T * M) 1``)."""
    if backend not in BACKENDS:
        raise InvalidArgumentError("backend", f"one of {BACKENDS}", repr(backend))
    work = work_dtype(qf)
    B, H, Nq, Fd = qf.shape
    Hk, Nk = kf.shape[1], kf.shape[2]
    G = H // Hk
    if not causal:
        kf, v = kf.to(work), v.to(work)
        state = kf.transpose(-1, -2) @ v  # (B, Hk, F, Dv)
        if append_ones:
            state = torch.cat([state, kf.sum(2)[..., None]], dim=-1)
        return (qf.to(work).reshape(B, Hk, G * Nq, Fd) @ state).view(B, H, Nq, -1)
    if _use_triton(backend, qf, Nq, Nk):
        from .triton_chunked import triton_state_product

        if append_ones:
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        return triton_state_product(qf, kf, v, decay=decay, chunk=chunk)
    if decay is not None and G > 1:  # a decay per query head needs a state per query head
        kf, v, Hk, G = repeat_kv(kf, G), repeat_kv(v, G), H, 1
    lam = None if decay is None else decay.to(qf.device, torch.float64)
    off = Nk - Nq
    if off < 0:  # the first -off queries precede every key: they see nothing
        rest = _causal_chunks(qf[:, :, -off:], kf, v, lam, None, chunk, segment, work, append_ones)
        return torch.cat([rest.new_zeros(B, H, -off, rest.shape[-1]), rest], dim=2)
    init = None
    if off > 0:  # keys before the first query are visible to every query: they start the state
        prefix_k = kf[:, :, :off].to(work)
        if lam is not None:
            powers = torch.arange(off - 1, -1, -1, device=qf.device, dtype=torch.float64)
            prefix_k = prefix_k * (lam[:, None] ** powers).to(work)[None, :, :, None]
        init = [prefix_k.transpose(-1, -2) @ v[:, :, :off].to(work)] + ([prefix_k.sum(2)[..., None]] if append_ones else [])
    return _causal_chunks(qf, kf[:, :, off:], v[:, :, off:], lam, init, chunk, segment, work, append_ones)


def _use_triton(backend: str, qf: torch.Tensor, len_q: int, len_kv: int) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise InvalidArgumentError("backend", "'triton' with triton installed (pip install triton)", "triton not importable")
        if len_q != len_kv:
            raise InvalidArgumentError("backend", "'triton' only for self-attention (Nq == Nk)", f"Nq={len_q}, Nk={len_kv}")
        return True
    return qf.is_cuda and len_q == len_kv and triton_available()


def triton_available() -> bool:
    """True when triton is importable (the kernel module is imported only when it runs)."""
    return importlib.util.find_spec("triton") is not None


def _decay_tables(lam: torch.Tensor, chunk: int, chunks: int, work: torch.dtype):
    """Per-head decay tables of one segment, shaped to broadcast against (B, H, n, rows, ...):
    intra-chunk weights (C, C), query scales (C, 1), key scales (C, 1), the state mixing W
    (n+1, n) with ``W[c, c'] = lambda^(C (c - 1 - c'))`` for c' < c, and the powers (n+1, 1, 1)
    of the incoming state."""
    i = torch.arange(chunk, device=lam.device)
    dist = (i[:, None] - i[None, :]).double()
    c = torch.arange(chunks + 1, device=lam.device)[:, None]
    gap = (c - 1 - torch.arange(chunks, device=lam.device)[None, :]).double()
    log = torch.log(lam)[:, None, None]  # (H, 1, 1)
    per_head = lambda t: t.to(work)[None, :, None]  # (H, a, b) -> (1, H, 1, a, b)  # noqa: E731
    intra = per_head(torch.where(dist >= 0, torch.exp(dist.clamp(min=0) * log), 0.0))
    q_scale = per_head(torch.exp((i + 1).double()[:, None] * log))
    k_scale = per_head(torch.exp((chunk - 1 - i).double()[:, None] * log))
    mix = torch.where(gap >= 0, torch.exp(gap.clamp(min=0) * chunk * log), 0.0).to(work)[None]
    init = torch.exp(c.double() * chunk * log).to(work)[None, ..., None]
    return intra, q_scale, k_scale, mix, init


def _exclusive_prefix(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the chunks before each chunk, x (B, H, n, a, b) -> ((B, H, n, a, b), total (B, H, a, b)),
    as two small triangular matmuls (within groups of ~sqrt(n) chunks, then across groups):
    torch's cumsum along a middle axis is several times slower on CPU."""
    B, H, n = x.shape[:3]
    size = max(1, math.isqrt(n))
    groups = -(-n // size)
    flat = x.flatten(3)
    if groups * size != n:
        flat = F.pad(flat, (0, 0, 0, groups * size - n))
    flat = flat.view(B, H, groups, size, -1)
    strict = lambda m: torch.ones(m, m, dtype=x.dtype, device=x.device).tril(-1)  # noqa: E731
    group_sums = flat.sum(3)  # (B, H, groups, a*b)
    before_groups = strict(groups) @ group_sums
    before = (strict(size) @ flat).add_(before_groups[:, :, :, None])
    total = before_groups[:, :, -1] + group_sums[:, :, -1]
    return before.flatten(2, 3)[:, :, :n].view(x.shape), total.view(B, H, *x.shape[3:])


def _causal_chunks(qf, kf, v, lam, init, chunk: int, segment: int, work: torch.dtype, append_ones: bool) -> torch.Tensor:
    """Causal product for Nq == Nk (after alignment), starting from the states ``init`` ([values
    (B, Hk, F, Dv)] plus [key sums (B, Hk, F, 1)] with ``append_ones``, or None). Query heads sharing
    a key head are stacked as extra rows of each chunk (no decay: one shared state), so every product
    is a plain batched matmul. The normaliser (``append_ones``) is tracked beside the values rather
    than as a 65th value column, which would slow every matmul down."""
    B, H, N, Fd = qf.shape
    Hk, Dv = kf.shape[1], v.shape[-1]
    G = H // Hk
    if lam is not None:  # the decayed state mixing is an (n+1) x n matmul: keep n small
        segment = min(segment, 64 * chunk)
    segment = max(chunk, segment // chunk * chunk)
    causal_w = (torch.arange(chunk, device=qf.device)[:, None] >= torch.arange(chunk, device=qf.device)[None, :]).to(work)
    tables = None if lam is None else _decay_tables(lam, chunk, segment // chunk, work)
    intra_w = causal_w.repeat(G, 1) if tables is None else tables[0]
    states = init or [None, None]
    outs = []
    for start in range(0, N, segment):
        stop = min(start + segment, N)
        length, pad = stop - start, (-(stop - start)) % chunk
        n = (length + pad) // chunk
        # one contiguous copy per segment, so every matmul below folds its batch dims without copying
        cut = lambda t: (F.pad(t, (0, 0, 0, pad)) if pad else t.contiguous()).view(B, -1, n, chunk, t.shape[-1])  # noqa: E731
        qs = cut(qf[:, :, start:stop].to(work))
        qs = qs.view(B, Hk, G, n, chunk, Fd).transpose(2, 3).reshape(B, Hk, n, G * chunk, Fd) if G > 1 else qs
        ks, vs = cut(kf[:, :, start:stop].to(work)), cut(v[:, :, start:stop].to(work))
        scores = (qs @ ks.transpose(-1, -2)).mul_(intra_w)  # inside chunks (in place: no extra temporaries)
        parts = [scores @ vs] + ([scores.sum(-1, keepdim=True)] if append_ones else [])
        if tables is not None:
            _, q_scale, k_scale, mix, init_pow = tables
            ks, qs = ks * k_scale, qs * q_scale
        contributions = [ks.transpose(-1, -2) @ vs] + ([ks.sum(-2)[..., None]] if append_ones else [])
        for i, chunk_state in enumerate(contributions):  # (B, Hk, n, F, Dv | 1): each chunk's keys and values
            if tables is None:
                before, total = _exclusive_prefix(chunk_state)
                if states[i] is not None:
                    before.add_(states[i][:, :, None])
                    total = total + states[i]
                states[i] = total
            else:
                mixed = (mix[..., : n + 1, :n] @ chunk_state.flatten(-2)).unflatten(-1, chunk_state.shape[-2:])
                if states[i] is not None:
                    mixed = mixed + init_pow[:, :, : n + 1] * states[i][:, :, None]
                before, states[i] = mixed[:, :, :n], mixed[:, :, n]
            parts[i] = parts[i].add_(qs @ before)
        out = torch.cat(parts, dim=-1) if append_ones else parts[0]
        if G > 1:
            out = out.view(B, Hk, n, G, chunk, -1).transpose(2, 3)
        outs.append(out.reshape(B, H, n * chunk, -1)[:, :, :length])
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
