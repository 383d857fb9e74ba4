"""Dense executors: torch SDPA for speed, the explicit-mask softmax every reference is built on, and
attention with its log-sum-exp (:func:`attention_with_lse`), which :func:`merge_attention` uses to
join attention over disjoint key sets exactly (split-KV, sinks beside a window, columns beside blocks).

Causal masks are aligned bottom-right when Nq != Nk (query i sees key j <= i + Nk - Nq), the
convention of FlashAttention and of a decoder's prefill over a cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ..masks import CausalMask


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else runs in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, N, D) -> (B, Hkv * groups, N, D): query head h uses key/value head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def executor_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype fused SDPA calls run in: q's own, except half precision on CPU, which runs in
    float32 (the CPU kernels are slow or inexact in float16 / bfloat16)."""
    return q.dtype if q.device.type != "cpu" or q.dtype in (torch.float32, torch.float64) else torch.float32


def causal_mask(len_q: int, len_kv: int, device=None) -> torch.Tensor:
    """Bottom-right aligned causal mask (Nq, Nk), True where attention is allowed
    (:class:`attnzoo.masks.CausalMask` evaluated densely)."""
    return CausalMask(len_kv - len_q)(0, 0, torch.arange(len_q, device=device)[:, None], torch.arange(len_kv, device=device)[None, :])


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention through torch's fused kernels, with GQA and bottom-right causal alignment."""
    groups = q.shape[1] // k.shape[1]
    if causal and q.shape[2] == 1:  # a decode step: bottom-right, its one query sees every key
        causal = False
    elif causal and q.shape[2] != k.shape[2]:
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
    dtype); see :func:`attention_probabilities`. Causal chunks compute only the keys their last row
    sees (the rest are zeros)."""
    n_q, n_k = q.shape[2], k.shape[2]
    allowed = causal_mask(n_q, n_k, q.device) if causal else None
    if mask is not None:
        allowed = mask if allowed is None else allowed & mask
    k = repeat_kv(k, q.shape[1] // k.shape[1]).to(dtype or work_dtype(k))
    for start in range(0, n_q, chunk):
        rows = slice(start, min(start + chunk, n_q))
        seen = min(n_k, max(1, rows.stop + n_k - n_q)) if causal else n_k
        probs = attention_probabilities(q[:, :, rows].to(k.dtype), k[:, :, :seen], scale=scale,
                                        mask=None if allowed is None else allowed[rows, :seen])
        yield rows, probs if seen == n_k else torch.nn.functional.pad(probs, (0, n_k - seen))


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> the additive form SDPA takes: 0 where allowed, -inf elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, zero - float("inf"))


def fold_heads(q: torch.Tensor, mask: torch.Tensor | None, groups: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GQA without copying keys: q (..., Hq, L, D) -> (..., Hq // groups, groups * L, D), each key
    head's query heads stacked as extra rows (row g * L + l is head g's query l); ``mask``
    (broadcastable to (..., Hq, L, K), or None) folded to match."""
    if groups == 1:
        return q, mask
    *lead, Hq, L, D = q.shape
    q = q.reshape(*lead, Hq // groups, groups * L, D)
    if mask is not None:
        mask = mask.expand(*mask.shape[:-2], L, mask.shape[-1])
        if mask.dim() >= 3 and mask.shape[-3] != 1:  # one mask per query head
            mask = mask.reshape(*mask.shape[:-3], Hq // groups, groups * L, mask.shape[-1])
        else:  # shared by the heads: repeated for each stacked head
            mask = mask.repeat(*([1] * (mask.dim() - 2)), groups, 1)
    return q, mask


def additive_attention_with_lse(q, k, v, mask: torch.Tensor | None, *, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of (..., L, D) queries to (..., K, D) keys with as many heads, an additive ``mask``
    (broadcastable to (..., L, K), or None): the output (..., L, Dv) in q's dtype and each row's
    natural log-sum-exp (..., L) in float32 (float64 stays); a row whose keys are all masked gets
    output 0 and log-sum-exp -inf. The CPU flash kernel when nothing needs gradients (its backward
    ignores the log-sum-exp) and values have the keys' width; explicit logits otherwise, O(L K)
    memory, differentiable through both outputs."""
    fused = q.device.type == "cpu" and q.dim() == 4 and v.shape[-1] == q.shape[-1]
    if fused and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        # the kernel reads the last dimension as unit-stride: other strides give wrong results
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        if mask is not None:  # the kernel returns 0 for a row with no key
            lse = lse.masked_fill(torch.isneginf(mask).all(-1), float("-inf"))
        return out, lse
    work = work_dtype(q)
    logits = q.to(work) @ k.to(work).transpose(-1, -2) * scale
    if mask is not None:
        logits = logits + mask
    lse = torch.logsumexp(logits, dim=-1)
    empty = torch.isneginf(lse)
    if bool(empty.any()):  # keep the backward of an all -inf row finite (0 instead of nan)
        lse = torch.logsumexp(logits.masked_fill(empty[..., None], 0.0), dim=-1).masked_fill(empty, float("-inf"))
    probs = torch.exp(logits - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
    return (probs @ v.to(work)).to(q.dtype), lse


def attention_with_lse(q, k, v, *, causal: bool = False, scale: float | None = None,
                       mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention and its log-sum-exp: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv),
    Hq a multiple of Hkv (GQA), ``mask`` bool broadcastable to (B, Hq, Nq, Nk) (True = attend),
    ``causal`` bottom-right aligned, ``scale`` default 1/sqrt(D) -> out (B, Hq, Nq, Dv) in q's dtype
    and lse (B, Hq, Nq), the natural log of each row's sum of exp(scaled logits) over its allowed
    keys, in float32 (float64 stays). A row with no allowed key gets out 0 and lse -inf.
    Differentiable in q, k and v through both outputs; :func:`merge_attention` joins the results
    over disjoint key sets."""
    from ..method import check_qkv

    call = check_qkv(q, k, v, causal=causal, scale=scale, check_finite=False)
    full = (call.batch, call.heads_q, call.len_q, call.len_kv)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise InvalidArgumentError("mask", "a bool tensor (True = attend) or None", getattr(mask, "dtype", type(mask).__name__))
        if mask.dim() > 4 or any(m not in (1, f) for m, f in zip(mask.shape[::-1], full[::-1])):
            raise InvalidArgumentError("mask", f"a shape broadcastable to {full}", tuple(mask.shape))
    if causal:
        cm = causal_mask(call.len_q, call.len_kv, q.device)
        mask = cm if mask is None else mask & cm
    work = work_dtype(q)
    folded, add = fold_heads(q.to(work), None if mask is None else additive_mask(mask, work), call.heads_q // call.heads_kv)
    out, lse = additive_attention_with_lse(folded, k.to(work), v.to(work), add, scale=call.scale)
    return out.reshape(*full[:3], -1).to(q.dtype), lse.reshape(full[:3])


def merge_attention(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the union of disjoint key sets, exactly, from each set's output
    (..., N, Dv) and natural log-sum-exp (..., N) -> (out (..., N, Dv), lse (..., N)) in the
    promoted dtype of the inputs. A row with no key in any set stays out 0, lse -inf.
    Differentiable in every output and log-sum-exp."""
    if len(outs) != len(lses) or not outs:
        raise InvalidArgumentError("outs, lses", "as many log-sum-exps as outputs, at least one", f"{len(outs)} and {len(lses)}")
    for i, (o, s) in enumerate(zip(outs, lses)):
        if o.shape[:-1] != s.shape or s.shape != lses[0].shape:
            raise InvalidArgumentError(f"outs[{i}], lses[{i}]", f"shapes (..., N, Dv) and (..., N) = {tuple(lses[0].shape)}",
                                       f"{tuple(o.shape)} and {tuple(s.shape)}")
    lse = torch.stack(list(lses))  # (P, ..., N)
    top = lse.detach().amax(0)  # the result does not depend on the shift: no gradient through it
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lse - top)
    total = weights.sum(0)
    seen = total > 0
    total = torch.where(seen, total, torch.ones_like(total))
    merged_lse = torch.where(seen, top + torch.log(total), torch.full_like(total, float("-inf")))
    weights = weights / total
    out = sum(o * w[..., None] for o, w in zip(outs, weights))
    return out, merged_lse
