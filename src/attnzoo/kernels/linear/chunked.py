"""The shared linear-attention executors (PyTorch): non-causal in one pass, causal in chunks.

Causal form (Lightning Attention-2 / flash-linear-attention "chunk" form): tokens are cut into
chunks of ``chunk``; inside a chunk the (decayed) causal product ``(q k^T * M) v`` is computed
quadratically, across chunks a ``F x Dv`` state ``S`` carries ``sum_j lambda^(p - j) k_j^T v_j``.
Chunks are processed a segment (``segment`` tokens) at a time: within a segment the states before
each chunk come from one small (chunks x chunks) matrix product, never a cumulative sum over
N x F x Dv, so temporaries stay O(segment) and memory is O(N (F + Dv)) overall. Everything
accumulates in float32 (float64 stays float64). The decay factors are powers ``lambda^e`` with
``e >= 0`` only, so nothing overflows however long the sequence; normalisers grow at most like N.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from ...errors import InvalidArgumentError
from .naive import safe_denominator, work_dtype

BACKENDS = ("auto", "torch", "triton")


def _check_decay(decay: torch.Tensor | None, heads: int) -> None:
    if decay is None:
        return
    if decay.shape != (heads,) or not bool(((decay > 0) & (decay <= 1)).all()):
        raise InvalidArgumentError("decay", f"a tensor of {heads} per-head factors in (0, 1]", decay)


def linear_attention(qf, kf, v, *, causal: bool, decay: torch.Tensor | None = None, normalize: bool = True,
                     eps: float = 1e-6, chunk: int = 64, segment: int = 1024, backend: str = "auto") -> torch.Tensor:
    """Linear attention with feature maps already applied.

    qf (B, H, Nq, F), kf (B, Hk, Nk, F), v (B, Hk, Nk, Dv), H a multiple of Hk; ``decay`` (H,) in
    (0, 1] or None. Returns ``(phi(Q) phi(K)^T * M) V`` (B, H, Nq, Dv) in the work dtype, divided
    row-wise by ``(phi(Q) phi(K)^T * M) 1 + eps`` when ``normalize`` (the normaliser rides along as
    an extra value column). Causal masks are bottom-right aligned; see :mod:`.naive` for the math.
    """
    _check_decay(decay, qf.shape[1])
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    out = state_product(qf, kf, v, causal=causal, decay=decay, chunk=chunk, segment=segment, backend=backend)
    if normalize:
        out = out[..., :-1] / safe_denominator(out[..., -1:], eps)
    return out


def state_product(qf, kf, v, *, causal: bool, decay: torch.Tensor | None = None, chunk: int = 64,
                  segment: int = 1024, backend: str = "auto") -> torch.Tensor:
    """The unnormalised product ``(phi(Q) phi(K)^T * M) V`` (shapes as :func:`linear_attention`)."""
    if backend not in BACKENDS:
        raise InvalidArgumentError("backend", f"one of {BACKENDS}", repr(backend))
    work = work_dtype(qf)
    B, H, Nq, Fd = qf.shape
    Hk, Nk, Dv = kf.shape[1], kf.shape[2], v.shape[-1]
    G = H // Hk
    if not causal:
        state = kf.to(work).transpose(-1, -2) @ v.to(work)  # (B, Hk, F, Dv)
        return (qf.to(work).reshape(B, Hk, G * Nq, Fd) @ state).view(B, H, Nq, Dv)
    if _use_triton(backend, qf, Nq, Nk):
        from .triton_chunked import triton_state_product

        return triton_state_product(qf, kf, v, decay=decay, chunk=chunk)
    lam = None if decay is None else decay.to(qf.device, torch.float64).view(Hk, G)
    off = Nk - Nq
    if off < 0:  # the first -off queries precede every key: they see nothing
        rest = _causal_chunks(qf[:, :, -off:], kf, v, lam, None, chunk, segment, work)
        return torch.cat([rest.new_zeros(B, H, -off, Dv), rest], dim=2)
    init = None
    if off > 0:  # keys before the first query are visible to every query: they start the state
        prefix_k = kf[:, :, :off].to(work).unsqueeze(2)
        if lam is not None:
            powers = torch.arange(off - 1, -1, -1, device=qf.device, dtype=torch.float64)
            prefix_k = prefix_k * (lam[..., None] ** powers).to(work)[None, ..., None]
        init = prefix_k.transpose(-1, -2) @ v[:, :, :off].to(work).unsqueeze(2)
    return _causal_chunks(qf, kf[:, :, off:], v[:, :, off:], lam, init, chunk, segment, work)


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


def _chunk_tables(lam: torch.Tensor | None, chunk: int, chunks: int, work: torch.dtype, device):
    """Decay tables of one segment, shaped to broadcast against (B, Hk, G, n, ...): intra-chunk
    weights (C, C), query scales (C, 1), key scales (C, 1), the state mixing W (n+1, n) with
    ``W[c, c'] = lambda^(C (c - 1 - c'))`` for c' < c, and the powers (n+1, 1, 1) of the incoming state."""
    i = torch.arange(chunk, device=device)
    dist = (i[:, None] - i[None, :]).double()
    c = torch.arange(chunks + 1, device=device)[:, None]
    gap = (c - 1 - torch.arange(chunks, device=device)[None, :]).double()
    if lam is None:
        return (dist >= 0).to(work), None, None, (gap >= 0).to(work), None
    log = torch.log(lam)[:, :, None, None]  # (Hk, G, 1, 1)
    per_chunk = lambda t: t.to(work)[None, :, :, None]  # (Hk, G, a, b) -> (1, Hk, G, 1, a, b)  # noqa: E731
    intra = per_chunk(torch.where(dist >= 0, torch.exp(dist.clamp(min=0) * log), 0.0))
    q_scale = per_chunk(torch.exp((i + 1).double()[:, None] * log))
    k_scale = per_chunk(torch.exp((chunk - 1 - i).double()[:, None] * log))
    mix = torch.where(gap >= 0, torch.exp(gap.clamp(min=0) * chunk * log), 0.0).to(work)[None]
    init = torch.exp(c.double() * chunk * log).to(work)[None, ..., None]
    return intra, q_scale, k_scale, mix, init


def _causal_chunks(qf, kf, v, lam, init, chunk: int, segment: int, work: torch.dtype) -> torch.Tensor:
    """Causal product for Nq == Nk (after alignment), starting from state ``init`` (B, Hk, G|1, F, Dv)."""
    B, H, N, Fd = qf.shape
    Hk, Dv = kf.shape[1], v.shape[-1]
    G = H // Hk
    segment = max(chunk, segment // chunk * chunk)
    chunks = segment // chunk
    intra_w, q_scale, k_scale, mix, init_pow = _chunk_tables(lam, chunk, chunks, work, qf.device)
    q5, k5, v5 = qf.view(B, Hk, G, N, Fd), kf.unsqueeze(2), v.unsqueeze(2)
    state = init
    outs = []
    for start in range(0, N, segment):
        stop = min(start + segment, N)
        length, pad = stop - start, (-(stop - start)) % chunk
        n = (length + pad) // chunk
        qs, ks, vs = (F.pad(t[..., start:stop, :].to(work), (0, 0, 0, pad)).unflatten(-2, (n, chunk)) for t in (q5, k5, v5))
        # inside chunks: (B, Hk, G, n, C, C) decayed causal scores
        scores = (qs @ ks.transpose(-1, -2)) * intra_w
        out = scores @ vs
        if k_scale is not None:
            ks = ks * k_scale
        chunk_kv = ks.transpose(-1, -2) @ vs  # (B, Hk, G|1, n, F, Dv)
        w = mix[..., : n + 1, :n]
        states = (w @ chunk_kv.flatten(-2)).unflatten(-1, (Fd, Dv))  # (…, n+1, F, Dv): before each chunk, then after
        if state is not None:
            states = states + (state.unsqueeze(-3) if init_pow is None else init_pow[..., : n + 1, :, :] * state.unsqueeze(-3))
        if q_scale is not None:
            qs = qs * q_scale
        out = out + qs @ states[..., :n, :, :]
        state = states[..., n, :, :]
        outs.append(out.flatten(3, 4)[..., :length, :])
    return torch.cat(outs, dim=-2).view(B, H, N, Dv)
