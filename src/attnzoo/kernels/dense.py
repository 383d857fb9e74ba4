"""Dense executors: torch SDPA for speed, and the explicit-mask softmax every reference is built on.

Causal masks are aligned bottom-right when Nq != Nk (query i sees key j <= i + Nk - Nq), the
convention of FlashAttention and of a decoder's prefill over a cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else runs in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, N, D) -> (B, Hkv * groups, N, D): query head h uses key/value head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def causal_mask(len_q: int, len_kv: int, device=None) -> torch.Tensor:
    """Bottom-right aligned causal mask (Nq, Nk), True where attention is allowed."""
    q = torch.arange(len_q, device=device)[:, None] + (len_kv - len_q)
    return torch.arange(len_kv, device=device)[None, :] <= q


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention through torch's fused kernels, with GQA and bottom-right causal alignment."""
    groups = q.shape[1] // k.shape[1]
    if causal and q.shape[2] != k.shape[2]:
        cm = causal_mask(q.shape[2], k.shape[2], q.device)
        mask = cm if mask is None else mask & cm
        causal = False
    if mask is not None:
        return masked_attention(q, k, v, mask, scale=scale)
    kw = {"enable_gqa": True} if groups > 1 else {}
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **kw)


def attention_scores(q: torch.Tensor, k: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Scaled logits (B, Hq, Nq, Nk) in float32 (float64 stays float64), GQA expanded."""
    work = work_dtype(q)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    return torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * scale


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis where ``mask`` is True; a row with no allowed key gets all zeros."""
    if mask is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def masked_attention(q, k, v, mask: torch.Tensor | None, *, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v, computed densely; ``mask`` broadcasts to (B, Hq, Nq, Nk)."""
    probs = masked_softmax(attention_scores(q, k, scale=scale), mask)
    v = repeat_kv(v, q.shape[1] // v.shape[1])
    return torch.matmul(probs, v.to(probs.dtype)).to(q.dtype)


def attention_probabilities(q, k, *, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact softmax probabilities (B, Hq, Nq, Nk) in the work dtype of q (B, Hq, Nq, D) over
    k (B, Hkv, Nk, D), where ``mask`` (broadcasting bool; None: everywhere) allows; a row with no
    allowed key is zeros. The one place exact attention weights are computed."""
    return masked_softmax(attention_scores(q, k, scale=scale), mask)


def exact_probabilities(q, k, *, causal: bool, scale: float, chunk: int = 256, dtype: torch.dtype | None = None,
                        mask: torch.Tensor | None = None):
    """Yield (row slice, exact softmax probabilities (B, Hq, rows, Nk)) of q (B, Hq, Nq, D) over
    k (B, Hkv, Nk, D), ``chunk`` query rows at a time (O(chunk Nk) memory), bottom-right causal
    when ``causal``, restricted to ``mask`` (Nq, Nk) when given; in ``dtype`` (default: the work
    dtype); see :func:`attention_probabilities`."""
    allowed = causal_mask(q.shape[2], k.shape[2], q.device) if causal else None
    if mask is not None:
        allowed = mask if allowed is None else allowed & mask
    k = repeat_kv(k, q.shape[1] // k.shape[1]).to(dtype or work_dtype(k))
    for start in range(0, q.shape[2], chunk):
        rows = slice(start, min(start + chunk, q.shape[2]))
        yield rows, attention_probabilities(q[:, :, rows].to(k.dtype), k, scale=scale, mask=None if allowed is None else allowed[rows])


def attention_with_lse(q, k, v, mask: torch.Tensor | None, *, scale: float):
    """Attention over (..., L, D) queries and (..., K, D) keys with an additive ``mask`` (or None),
    returning the output and each row's log-sum-exp (..., L); a row whose keys are all masked
    gets output 0 and log-sum-exp -inf. The CPU flash kernel without gradients (its backward
    ignores the log-sum-exp) when values have the keys' width, explicit softmax otherwise."""
    fused = q.device.type == "cpu" and v.shape[-1] == q.shape[-1]
    if fused and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        if mask is not None:  # the kernel returns 0 for a row with no key
            lse = lse.masked_fill(torch.isneginf(mask).all(-1), float("-inf"))
        return out, lse
    logits = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        logits = logits + mask
    lse = torch.logsumexp(logits, dim=-1)
    empty = torch.isneginf(lse)
    if bool(empty.any()):  # keep the backward of an all -inf row finite (0 instead of nan)
        lse = torch.logsumexp(logits.masked_fill(empty[..., None], 0.0), dim=-1).masked_fill(empty, float("-inf"))
    return torch.exp(logits - torch.where(empty, torch.zeros_like(lse), lse)[..., None]) @ v, lse


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Softmax attention over the union of two disjoint key sets, from each set's output
    (..., N, Dv) and log-sum-exp (..., N); a row that sees no key in either stays 0."""
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w_a, w_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = w_a + w_b
    total = torch.where(total > 0, total, torch.ones_like(total))
    return out_a * (w_a / total)[..., None] + out_b * (w_b / total)[..., None]
