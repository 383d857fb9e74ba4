"""Triton kernel for the chunked causal linear-attention product (forward).

One program per (batch, head, block of value columns) walks the chunks in order, keeping the
``F x Dv`` state in registers: inside a chunk ``(q k^T * D) v`` with the decayed causal weights
``D_ij = lambda^(i - j)``, across chunks ``lambda^(i+1) q S``, then ``S <- lambda^C S + (k *
lambda^(C-1-j))^T v`` (Lightning Attention-2's forward). Float32 state and accumulation.

Backward: gradients are computed by recomputing the PyTorch chunked executor under autograd (the
Triton backward is not written). Runs on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...errors import InvalidArgumentError


@triton.jit
def _chunked_fwd(Q, K, V, O, LOG_DECAY, N, H, G,
                 s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
                 FD: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
                 PRECISION: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    log_lam = tl.load(LOG_DECAY + h)
    offs_c = tl.arange(0, C)
    offs_f = tl.arange(0, BLOCK_F)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_f = offs_f < FD
    mask_v = offs_v < DV
    dist = (offs_c[:, None] - offs_c[None, :]).to(tl.float32)
    intra_w = tl.where(dist >= 0, tl.exp(tl.maximum(dist, 0.0) * log_lam), 0.0)
    q_scale = tl.exp((offs_c + 1).to(tl.float32) * log_lam)
    k_scale = tl.exp((C - 1 - offs_c).to(tl.float32) * log_lam)
    chunk_decay = tl.exp(C * log_lam)
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
        state = state * chunk_decay + tl.dot(tl.trans(k * k_scale[:, None]), v, input_precision=PRECISION)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch(qf, kf, v, decay, chunk):
    if not (qf.is_cuda or _interpreting()):
        raise InvalidArgumentError("backend", "'triton' on CUDA tensors (or TRITON_INTERPRET=1 on CPU)", f"tensors on {qf.device}")
    B, H, N, Fd = qf.shape
    Hk, Dv = kf.shape[1], v.shape[-1]
    qf, kf, v = (t.contiguous() for t in (qf, kf, v))
    out = torch.empty(B, H, N, Dv, device=qf.device, dtype=torch.float32)
    log_decay = torch.zeros(H, device=qf.device, dtype=torch.float32) if decay is None else torch.log(decay.to(qf.device, torch.float32))
    chunk = max(16, triton.next_power_of_2(chunk))
    block_f = max(16, triton.next_power_of_2(Fd))
    block_v = min(32, max(16, triton.next_power_of_2(Dv)))  # more programs, fewer registers each
    precision = "ieee" if qf.dtype in (torch.float32, torch.float64) else "tf32"
    grid = (B * H, triton.cdiv(Dv, block_v))
    _chunked_fwd[grid](qf, kf, v, out, log_decay, N, H, H // Hk,
                       qf.stride(0), qf.stride(1), qf.stride(2), kf.stride(0), kf.stride(1), kf.stride(2),
                       v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                       FD=Fd, DV=Dv, C=chunk, BLOCK_F=block_f, BLOCK_V=block_v, PRECISION=precision)
    return out


class _TritonChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qf, kf, v, decay, chunk):
        ctx.save_for_backward(qf, kf, v)
        ctx.decay, ctx.chunk = decay, chunk
        return _launch(qf, kf, v, decay, chunk)

    @staticmethod
    def backward(ctx, grad_out):
        from .chunked import state_product

        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = state_product(*inputs, causal=True, decay=ctx.decay, chunk=ctx.chunk, backend="torch")
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (*(next(grads) if t.requires_grad else None for t in inputs), None, None)


def triton_state_product(qf, kf, v, *, decay: torch.Tensor | None, chunk: int = 64) -> torch.Tensor:
    """Causal ``(phi(Q) phi(K)^T * M) V`` for Nq == Nk: qf (B, H, N, F), kf (B, Hk, N, F),
    v (B, Hk, N, Dv), decay (H,) or None -> float32 (B, H, N, Dv)."""
    return _TritonChunked.apply(qf, kf, v, decay, chunk)
