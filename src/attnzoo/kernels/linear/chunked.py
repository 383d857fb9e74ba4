"""The shared linear-attention executors and their dispatch.

Executors (name, backend): ``one_pass`` (torch; non-causal, ``phi(Q) (phi(K)^T V)``), ``chunked``
(torch; causal, below) and ``triton`` (triton; causal self-attention on CUDA, or on CPU under
``TRITON_INTERPRET=1``; :mod:`.triton_chunked`). ``backend="auto"`` tries ``triton, chunked,
one_pass`` on CUDA when triton is installed, ``chunked, one_pass`` elsewhere; ``torch`` tries
``one_pass, chunked``; :func:`linear_executor` says which one runs a call. Every executor can start
from a state and return the state after its last key (:func:`state_product`), so a sequence can be
run in pieces (prefill, then decoding).

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

import functools
import importlib.util
import math
import os

import torch
import torch.nn.functional as F

from ...errors import InvalidArgumentError, UnsupportedError
from ..backends import Dispatcher, Executor
from ..dense import repeat_kv
from .naive import safe_denominator, work_dtype


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    """True when triton is importable (the kernel module is imported only when it runs)."""
    return importlib.util.find_spec("triton") is not None


def _one_pass_can_run(qf, kf, v, causal: bool) -> str | None:
    return "causal attention (it runs in chunks)" if causal else None


def _chunked_can_run(qf, kf, v, causal: bool) -> str | None:
    return None if causal else "non-causal attention (it runs in one pass)"


def _triton_can_run(qf, kf, v, causal: bool) -> str | None:
    if not causal:
        return "non-causal attention (the kernel is the causal chunked form)"
    if not triton_available():
        return "triton is not installed (pip install triton)"
    if not (qf.is_cuda or interpreting()):
        return f"tensors on {qf.device.type} (needs CUDA, or TRITON_INTERPRET=1 on CPU)"
    if qf.shape[2] != kf.shape[2]:
        return f"Nq = {qf.shape[2]} != Nk = {kf.shape[2]} (self-attention only)"
    return None


def _state_heads(qf, kf, decay) -> int:
    """Heads of the carried state: one per key head (query heads that share a key head share it),
    or one per query head when a per-head decay makes their states differ."""
    return qf.shape[1] if decay is not None else kf.shape[1]


def _check_call(qf, kf, v, *, causal: bool, decay, append_ones: bool, initial_state) -> None:
    """Decay and initial state against the shapes (O(1) but for the decay range, one reduction)."""
    H = qf.shape[1]
    if decay is not None:
        if not causal:
            raise InvalidArgumentError("decay", "None with causal=False (decay weighs key j <= i by lambda^(i-j))", "a decay tensor")
        if decay.shape != (H,) or not bool(((decay > 0) & (decay <= 1)).all()):
            raise InvalidArgumentError("decay", f"a tensor of {H} per-head factors in (0, 1]", decay)
    if initial_state is None:
        return
    B, Fd, Dv = qf.shape[0], qf.shape[3], v.shape[3]
    expected = (B, _state_heads(qf, kf, decay), Fd, Dv + append_ones)
    if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != expected:
        got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
        raise InvalidArgumentError("initial_state", f"a tensor of shape {expected} (the state a previous call returned)", got)
    if initial_state.device != qf.device:
        raise InvalidArgumentError("initial_state", f"a tensor on {qf.device}", initial_state.device)
    if causal and qf.shape[2] > kf.shape[2]:
        raise UnsupportedError(f"initial_state: expected Nq <= Nk with causal=True, got Nq = {qf.shape[2]} > Nk = "
                               f"{kf.shape[2]} (the first queries would precede the state's last key)")


def linear_attention(qf, kf, v, *, causal: bool, decay: torch.Tensor | None = None, normalize: bool = True,
                     eps: float = 1e-6, chunk: int = 64, segment: int = 16384, backend: str = "auto",
                     initial_state: torch.Tensor | None = None, return_state: bool = False):
    """Linear attention with feature maps already applied.

    qf (B, H, Nq, F), kf (B, Hk, Nk, F), v (B, Hk, Nk, Dv), H a multiple of Hk; ``decay`` (H,) in
    (0, 1] or None (causal only). Returns ``(phi(Q) phi(K)^T * M) V`` (B, H, Nq, Dv) in the work
    dtype, divided row-wise by ``(phi(Q) phi(K)^T * M) 1 + eps`` when ``normalize`` (the normaliser
    rides along as an extra value column of ones). Causal masks are bottom-right aligned; see
    :mod:`.naive`. ``initial_state`` / ``return_state``: see :func:`state_product` (the state has
    the normaliser column when ``normalize``); with ``return_state`` returns (out, state).
    """
    result = state_product(qf, kf, v, causal=causal, decay=decay, chunk=chunk, segment=segment, backend=backend,
                           append_ones=normalize, initial_state=initial_state, return_state=return_state)
    out, state = result if return_state else (result, None)
    if normalize:
        out = out[..., :-1] / safe_denominator(out[..., -1:], eps)
    return (out, state) if return_state else out


def state_product(qf, kf, v, *, causal: bool, decay: torch.Tensor | None = None, chunk: int = 64,
                  segment: int = 16384, backend: str = "auto", append_ones: bool = False,
                  initial_state: torch.Tensor | None = None, return_state: bool = False):
    """The unnormalised product ``(phi(Q) phi(K)^T * M) V`` (shapes as :func:`linear_attention`);
    ``append_ones`` adds a column of ones to V (its output is the normaliser ``(phi(Q) phi(K)^T * M) 1``).

    The state carries a sequence across calls: ``S = sum_j lambda^(last - j) phi(k_j)^T [v_j, 1]``
    over the keys seen so far (decayed to the last key; no decay: plain sums), shape
    (B, Hs, F, Dv + append_ones) in the work dtype, with Hs = Hk (query heads sharing a key head share
    it) or Hs = H when ``decay`` is given. With ``return_state`` returns (out, state). A call given
    ``initial_state`` continues after those keys: causal queries see them (decayed by
    ``lambda^(p + 1)`` at position p of this call), non-causal queries see them all; running a
    sequence in pieces passing the state equals one call (causal: Nq <= Nk per piece).
    """
    executor = linear_executor(qf, kf, v, causal=causal, backend=backend)
    _check_call(qf, kf, v, causal=causal, decay=decay, append_ones=append_ones, initial_state=initial_state)
    out, state = executor.run(qf, kf, v, decay=decay, chunk=chunk, segment=segment, append_ones=append_ones,
                              initial_state=initial_state, return_state=return_state)
    return (out, state) if return_state else out


def _one_pass(qf, kf, v, *, decay, chunk, segment, append_ones, initial_state, return_state):
    """Non-causal: ``phi(Q) (S0 + phi(K)^T [V, 1])`` in one pass; returns (out, state)."""
    work = work_dtype(qf)
    B, H, Nq, Fd = qf.shape
    Hk = kf.shape[1]
    kf, v = kf.to(work), v.to(work)
    state = kf.transpose(-1, -2) @ v  # (B, Hk, F, Dv)
    if append_ones:
        state = torch.cat([state, kf.sum(2)[..., None]], dim=-1)
    if initial_state is not None:
        state = state + initial_state.to(work)
    return (qf.to(work).reshape(B, Hk, H // Hk * Nq, Fd) @ state).view(B, H, Nq, -1), state


def _chunked(qf, kf, v, *, decay, chunk, segment, append_ones, initial_state, return_state):
    """Causal, in chunks (module docstring); returns (out, state or None)."""
    work = work_dtype(qf)
    B, H, Nq, Fd = qf.shape
    Hk, Nk = kf.shape[1], kf.shape[2]
    G = H // Hk
    if decay is not None and G > 1:  # a decay per query head needs a state per query head
        kf, v = repeat_kv(kf, G), repeat_kv(v, G)
    lam = None if decay is None else decay.to(qf.device, torch.float64)
    states = None
    if initial_state is not None:  # [values, key sums] as the chunks track them
        states = list(initial_state.to(work).split([v.shape[-1], 1], dim=-1)) if append_ones else [initial_state.to(work)]
    off = Nk - Nq
    if off < 0:  # the first -off queries precede every key: they see nothing (no initial state here)
        rest, states = _causal_chunks(qf[:, :, -off:], kf, v, lam, None, chunk, segment, work, append_ones, return_state)
        out = torch.cat([rest.new_zeros(B, H, -off, rest.shape[-1]), rest], dim=2)
    else:
        if off > 0:  # keys before the first query are visible to every query: they start the state
            prefix_k = kf[:, :, :off].to(work)
            if lam is not None:
                powers = torch.arange(off - 1, -1, -1, device=qf.device, dtype=torch.float64)
                prefix_k = prefix_k * (lam[:, None] ** powers).to(work)[None, :, :, None]
            prefix = [prefix_k.transpose(-1, -2) @ v[:, :, :off].to(work)] + ([prefix_k.sum(2)[..., None]] if append_ones else [])
            if states is not None:  # the incoming state, decayed across the prefix
                carry = 1.0 if lam is None else (lam**off).to(work)[None, :, None, None]
                prefix = [p + carry * s for p, s in zip(prefix, states)]
            states = prefix
        out, states = _causal_chunks(qf, kf[:, :, off:], v[:, :, off:], lam, states, chunk, segment, work, append_ones, return_state)
    return out, (torch.cat(states, dim=-1) if return_state else None)


def linear_executor(qf, kf, v, *, causal: bool, backend: str = "auto") -> Executor:
    """The executor :func:`state_product` / :func:`linear_attention` run for these arguments
    (``.name``: ``one_pass``, ``chunked`` or ``triton``; ``.backend``)."""
    return LINEAR.choose(backend, qf, kf, v, causal)


def _triton(qf, kf, v, *, decay, chunk, segment, append_ones, initial_state, return_state):
    from .triton_chunked import triton_state_product

    if append_ones:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    return triton_state_product(qf, kf, v, decay=decay, chunk=chunk, initial_state=initial_state, return_state=return_state)


ONE_PASS = Executor("one_pass", "torch", _one_pass_can_run, _one_pass)
CHUNKED = Executor("chunked", "torch", _chunked_can_run, _chunked)
TRITON = Executor("triton", "triton", _triton_can_run, _triton)


def _auto_order(device: torch.device) -> tuple[Executor, ...]:
    if device.type == "cuda" and triton_available():
        return (TRITON, CHUNKED, ONE_PASS)
    return (CHUNKED, ONE_PASS)


LINEAR = Dispatcher("linear", (ONE_PASS, CHUNKED, TRITON), _auto_order)
BACKENDS = LINEAR.accepted  # ("auto", "torch", "triton")


def choose_backend(requested: str, device: torch.device) -> str:
    """The backend a call on ``device`` runs: ``auto`` -> ``triton`` on CUDA (when installed),
    ``torch`` elsewhere; an explicit choice is kept. Non-causal and cross-attention calls run the
    torch executors under ``auto`` whatever this says (:func:`linear_executor` tells)."""
    return LINEAR.resolve(requested, device)


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


def _causal_chunks(qf, kf, v, lam, init, chunk: int, segment: int, work: torch.dtype, append_ones: bool,
                   exact_state: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Causal product for Nq == Nk (after alignment), starting from the states ``init`` ([values
    (B, Hk, F, Dv)] plus [key sums (B, Hk, F, 1)] with ``append_ones``, or None); returns it and
    the states after the last key. Query heads sharing a key head are stacked as extra rows of each
    chunk (no decay: one shared state), so every product is a plain batched matmul. The normaliser
    (``append_ones``) is tracked beside the values rather than as a 65th value column, which would
    slow every matmul down. With decay the padding of a ragged last chunk decays the final states
    too far; ``exact_state`` recomputes them from the state before that chunk."""
    B, H, N, Fd = qf.shape
    Hk = kf.shape[1]
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
        tail = None
        if tables is not None:
            _, q_scale, k_scale, mix, init_pow = tables
            if exact_state and pad:
                tail = _tail_states(lam, ks[:, :, -1], vs[:, :, -1], chunk - pad, work, append_ones)
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
                if tail is not None:  # the last chunk's r real keys on top of the state before it
                    carry, added = tail
                    states[i] = carry * mixed[:, :, n - 1] + added[i]
            parts[i] = parts[i].add_(qs @ before)
        out = torch.cat(parts, dim=-1) if append_ones else parts[0]
        if G > 1:
            out = out.view(B, Hk, n, G, chunk, -1).transpose(2, 3)
        outs.append(out.reshape(B, H, n * chunk, -1)[:, :, :length])
    return (torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]), states[: 1 + append_ones]


def _tail_states(lam: torch.Tensor, k_last: torch.Tensor, v_last: torch.Tensor, real: int, work: torch.dtype, append_ones: bool):
    """For a last chunk with ``real`` keys (then zero padding): the decay ``lambda^real`` that
    carries the state before it (1, H, 1, 1), and its keys' contributions [values (B, H, F, Dv)]
    plus [key sums (B, H, F, 1)] decayed to its last real key. k_last (B, H, C, F), v_last (B, H, C, Dv)."""
    i = torch.arange(k_last.shape[2], device=lam.device)
    log = torch.log(lam)[:, None]  # (H, 1)
    weights = torch.where(i < real, torch.exp((real - 1 - i).clamp(min=0).double() * log), 0.0).to(work)
    k_last = k_last * weights[None, :, :, None]
    added = [k_last.transpose(-1, -2) @ v_last] + ([k_last.sum(-2)[..., None]] if append_ones else [])
    return torch.exp(real * log).to(work)[None, :, :, None], added
