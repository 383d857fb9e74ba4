"""Triton kernel for the chunked causal linear-attention product (forward).

One program per (batch, head, block of value columns) walks the chunks in order, keeping the
``F x Dv`` state in registers: inside a chunk ``(q k^T * D) v`` with the decayed causal weights
``D_ij = lambda^(i - j)``, across chunks ``lambda^(i+1) q S``, then ``S <- lambda^L S + (k *
lambda^(L-1-j))^T v`` for a chunk of L real keys (Lightning Attention-2's forward). Float32 state
and accumulation. The state may start from ``initial_state`` and be written out at the end, in the
layout of :func:`~attnzoo.kernels.linear.chunked.state_product` (per key head: the first query
head of each group writes it; per query head with decay).

Backward: gradients are computed by recomputing the PyTorch chunked executor under autograd (the
Triton backward is not written). Runs on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _chunked_fwd(Q, K, V, O, S0, SF, LOG_DECAY, N, H, G, SG,
                 s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on, s_sb, s_sh, s_sf,
                 FD: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
                 PRECISION: tl.constexpr, HAS_INIT: tl.constexpr, STORE_STATE: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    hs = h // SG  # the state's head: the key head (SG = G) or the query head (SG = 1)
    log_lam = tl.load(LOG_DECAY + h)
    offs_c = tl.arange(0, C)
    offs_f = tl.arange(0, BLOCK_F)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_f = offs_f < FD
    mask_v = offs_v < DV
    dist = (offs_c[:, None] - offs_c[None, :]).to(tl.float32)
    intra_w = tl.where(dist >= 0, tl.exp(tl.maximum(dist, 0.0) * log_lam), 0.0)
    q_scale = tl.exp((offs_c + 1).to(tl.float32) * log_lam)
    state_at = b * s_sb + hs * s_sh + offs_f[:, None] * s_sf + offs_v[None, :]
    state_mask = mask_f[:, None] & mask_v[None, :]
    if HAS_INIT:
        state = tl.load(S0 + state_at, mask=state_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_F, BLOCK_V), dtype=tl.float32)
    for start in range(0, N, C):
        rows = start + offs_c
        mask_n = rows < N
        q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qn + offs_f[None, :], mask=mask_n[:, None] & mask_f[None, :], other=0.0).to(tl.float32)
        k = tl.load(K + b * s_kb + hk * s_kh + rows[:, None] * s_kn + offs_f[None, :], mask=mask_n[:, None] & mask_f[None, :], other=0.0).to(tl.float32)
        v = tl.load(V + b * s_vb + hk * s_vh + rows[:, None] * s_vn + offs_v[None, :], mask=mask_n[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * intra_w
        out = tl.dot(scores, v, input_precision=PRECISION)
        out += tl.dot(q, state, input_precision=PRECISION) * q_scale[:, None]
        tl.store(O + b * s_ob + h * s_oh + rows[:, None] * s_on + offs_v[None, :], out, mask=mask_n[:, None] & mask_v[None, :])
        real = tl.minimum(N - start, C)  # keys in this chunk: the state decays to its last real one
        k_scale = tl.where(offs_c < real, tl.exp((real - 1 - offs_c).to(tl.float32) * log_lam), 0.0)
        state = state * tl.exp(real.to(tl.float32) * log_lam) + tl.dot(tl.trans(k * k_scale[:, None]), v, input_precision=PRECISION)
    if STORE_STATE:
        if h % SG == 0:  # query heads sharing a state computed it alike: the first writes it
            tl.store(SF + state_at, state, mask=state_mask)


def _launch(qf, kf, v, initial_state, decay, chunk, return_state):
    B, H, N, Fd = qf.shape
    Hk, Dv = kf.shape[1], v.shape[-1]
    G = H // Hk
    SG = G if decay is None else 1  # query heads per state
    qf, kf, v = (t.contiguous() for t in (qf, kf, v))
    out = torch.empty(B, H, N, Dv, device=qf.device, dtype=torch.float32)
    state = torch.empty(B, H // SG, Fd, Dv, device=qf.device, dtype=torch.float32) if return_state else None
    init = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    log_decay = torch.zeros(H, device=qf.device, dtype=torch.float32) if decay is None else torch.log(decay.to(qf.device, torch.float32))
    chunk = max(16, triton.next_power_of_2(chunk))
    block_f = max(16, triton.next_power_of_2(Fd))
    block_v = min(32, max(16, triton.next_power_of_2(Dv)))  # more programs, fewer registers each
    precision = "ieee" if qf.dtype in (torch.float32, torch.float64) else "tf32"
    grid = (B * H, triton.cdiv(Dv, block_v))
    state_strides = ((H // SG) * Fd * Dv, Fd * Dv, Dv)  # contiguous (B, Hs, F, Dv), for both states
    _chunked_fwd[grid](qf, kf, v, out, out if init is None else init, out if state is None else state, log_decay, N, H, G, SG,
                       qf.stride(0), qf.stride(1), qf.stride(2), kf.stride(0), kf.stride(1), kf.stride(2),
                       v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), *state_strides,
                       FD=Fd, DV=Dv, C=chunk, BLOCK_F=block_f, BLOCK_V=block_v, PRECISION=precision,
                       HAS_INIT=init is not None, STORE_STATE=return_state)
    return out, state


class _TritonChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qf, kf, v, initial_state, decay, chunk, return_state):
        ctx.save_for_backward(qf, kf, v, initial_state)
        ctx.decay, ctx.chunk, ctx.return_state = decay, chunk, return_state
        out, state = _launch(qf, kf, v, initial_state, decay, chunk, return_state)
        return (out, state) if return_state else out

    @staticmethod
    def backward(ctx, grad_out, grad_state=None):
        from .chunked import state_product

        needs = ctx.needs_input_grad[:4]
        inputs = [t if t is None else t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs)]
        qf, kf, v, initial_state = inputs
        with torch.enable_grad():
            result = state_product(qf, kf, v, causal=True, decay=ctx.decay, chunk=ctx.chunk, backend="torch",
                                   initial_state=initial_state, return_state=ctx.return_state)
            outputs, grads_out = (result, (grad_out, grad_state)) if ctx.return_state else ((result,), (grad_out,))
            wanted = [t for t, need in zip(inputs, needs) if need]
            grads = iter(torch.autograd.grad(outputs, wanted, grads_out))
        return (*(next(grads) if need else None for need in needs), None, None, None)


def triton_state_product(qf, kf, v, *, decay: torch.Tensor | None, chunk: int = 64, initial_state: torch.Tensor | None = None,
                         return_state: bool = False):
    """Causal ``(phi(Q) phi(K)^T * M) V`` for Nq == Nk: qf (B, H, N, F), kf (B, Hk, N, F),
    v (B, Hk, N, Dv), decay (H,) or None, initial_state (B, Hs, F, Dv) or None (Hs = Hk, or H
    with decay) -> float32 out (B, H, N, Dv) and, with ``return_state``, the float32 state after
    the last key (else None)."""
    if return_state:
        return _TritonChunked.apply(qf, kf, v, initial_state, decay, chunk, True)
    return _TritonChunked.apply(qf, kf, v, initial_state, decay, chunk, False), None
