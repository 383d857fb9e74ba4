"""CPU block-sparse executor: each query block against the keys it visits, as one small dense GEMM.

Faster Neighborhood Attention (arXiv 2403.04690) shows local attention as batched GEMM; this is that
idea on top of torch's fused CPU SDPA kernel:

* Query blocks whose keys form one contiguous range (1-D bands: sliding window, streaming) read that
  range as a slice: no copy.
* Other blocks gather their keys (a few times the size of K for a 2-D tile) in chunks, so memory
  stays linear in N.
* Query blocks are grouped by identical token masks ("mask classes"): a class runs with one
  broadcast additive mask, which torch's CPU kernel handles at the speed of no mask, whereas a
  different mask per block runs about 2.4x slower (measured at 2 threads, N = 16,384).

For static patterns the plan (token lists, masks, classes) is cached on the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..dense import (
    additive_attention_with_lse,
    additive_mask,
    executor_dtype,
    fold_heads,
    merge_attention,
    work_dtype,
)
from .layout import BlockLayout

_CHUNK_KEYS = 2048  # gathered keys per SDPA call: small enough to stay in cache on a CPU


@dataclass
class _Group:
    """Query blocks that run the same way: their ids, their keys, and their shared (or own) mask."""

    blocks: torch.Tensor  # (n,) query block ids
    kv_pos: torch.Tensor  # (n, K) original key indices
    starts: torch.Tensor | None  # (n,) first key of each block's slice, when its keys are one range
    width: int  # K, keys per block
    mask: torch.Tensor | None  # additive float: (K,)-broadcast (bq, K), per block (n, bq, K), or None


@dataclass
class _Prefix:
    """Leading keys [0, size) that some blocks visit besides their range (attention sinks): one SDPA
    call over them for all those rows, merged with the range's output by log-sum-exp."""

    size: int
    rows: torch.Tensor  # (M,) original query indices that visit the prefix
    mask: torch.Tensor | None  # additive (M, size), or None where every pair is allowed
    empty: torch.Tensor  # (M,) bool: no allowed prefix key in this row
    band_empty: torch.Tensor | None  # original query indices with no allowed key in their range


@dataclass
class _Plan:
    q_pos: torch.Tensor  # (nQB, bq) original query index, -1 for padding
    groups: list[_Group]
    empty_rows: torch.Tensor | None  # original query indices with no allowed key (output 0)
    allowed: int  # allowed (query, key) entries
    computed: int  # entries the executor computes
    prefix: _Prefix | None = None


_PLAN_CHUNK = 64  # query blocks whose token masks are formed at once while planning


def _plan_for(layout: BlockLayout, kv_pos: torch.Tensor, bl: int, hl: int, dtype: torch.dtype, static: bool,
              split_prefix: bool) -> _Plan:
    """Token lists and mask classes for one (layout batch, layout head); masks are formed a chunk
    of query blocks at a time and only one mask per class is kept, so memory stays linear in N.
    ``kv_pos``: (nQB, K) original key indices of this batch row and head."""
    dev = layout.device
    q_pos = layout.q_tokens()
    real_q = q_pos >= 0
    starts, width, prefix = None, kv_pos.shape[-1], 0
    if layout.covers_mask and layout.kv_order is None and layout.q_order is None:
        # A 1-D band: read a contiguous range per block instead of gathering; with split_prefix,
        # also a band after a shared prefix of leading keys (sinks), attended separately.
        band = _band(kv_pos, 0)
        if band is None and split_prefix:
            prefix = _shared_prefix(kv_pos)
            band = _band(kv_pos, prefix) if prefix else None
        if band is None:
            prefix = 0
        else:
            lo, width = band
            starts = lo.clamp(max=layout.num_kv - width).clamp(min=prefix)
            has_prefix = ((kv_pos >= 0) & (kv_pos < prefix)).sum(-1) == prefix if prefix else None
            kv_pos = starts[:, None] + torch.arange(width, device=dev)
    b = torch.tensor(bl, device=dev)
    h = torch.tensor(hl, device=dev)
    full_ids: list[torch.Tensor] = []
    classes: dict[bytes, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    own_ids: list[torch.Tensor] = []
    own_masks: list[torch.Tensor] = []
    empty_rows: list[torch.Tensor] = []
    allowed = 0
    for a in range(0, q_pos.shape[0], _PLAN_CHUNK):
        ids = torch.arange(a, min(a + _PLAN_CHUNK, q_pos.shape[0]), device=dev)
        qp = q_pos[ids]
        mask = layout.token_mask(qp[:, :, None], kv_pos[ids][:, None, :], b, h)  # (c, bq, K)
        row_any = mask.any(-1)
        allowed += int(torch.count_nonzero(mask))
        empty = (qp >= 0) & ~row_any
        if bool(empty.any()):
            empty_rows.append(qp[empty])
        mask |= ~row_any[..., None]  # padding and empty rows attend everywhere; output fixed later
        full = mask.flatten(1).all(-1)
        full_ids.append(ids[full])
        rest = torch.nonzero(~full).flatten()
        if not static:
            own_ids.append(ids[rest])
            own_masks.append(mask[rest])
            continue
        for i in rest.tolist():
            key = mask[i].numpy().tobytes() if mask.device.type == "cpu" else mask[i].cpu().numpy().tobytes()
            if key not in classes:
                classes[key] = (mask[i].clone(), [])
            classes[key][1].append(ids[i : i + 1])
    groups: list[_Group] = []

    def add(ids: torch.Tensor, m: torch.Tensor | None) -> None:
        if ids.numel():
            groups.append(_Group(ids, kv_pos[ids], None if starts is None else starts[ids], width, m))

    add(torch.cat(full_ids), None)
    for m, members in classes.values():
        add(torch.cat(members), additive_mask(m, dtype))
    if own_ids:
        add(torch.cat(own_ids), additive_mask(torch.cat(own_masks), dtype))
    band_empty = torch.cat(empty_rows) if empty_rows else None
    computed = int(real_q.sum()) * width
    plan = _Plan(q_pos, groups, band_empty, allowed, computed)
    if prefix:
        rows = q_pos[has_prefix].flatten()
        rows = rows[rows >= 0]
        mask = layout.token_mask(rows[:, None], torch.arange(prefix, device=dev)[None, :], b, h)
        row_any = mask.any(-1)
        plan.prefix = _Prefix(prefix, rows, None if bool(mask.all()) else additive_mask(mask | ~row_any[:, None], dtype), ~row_any, band_empty)
        plan.allowed += int(torch.count_nonzero(mask))
        plan.computed += rows.numel() * prefix
        if band_empty is not None:
            plan.empty_rows = band_empty[~torch.isin(band_empty, rows[row_any])]
    return plan


def _band(kv_pos: torch.Tensor, prefix: int) -> tuple[torch.Tensor, int] | None:
    """(first key, width) of the range spanned by each block's keys at or after ``prefix``, when no
    span is wider than the key lists (a superset is fine: the token mask still applies); None
    otherwise. kv_pos (nQB, K), -1 for holes."""
    valid = kv_pos >= prefix
    lo = torch.where(valid, kv_pos, torch.iinfo(torch.int64).max).amin(-1)
    hi = torch.where(valid, kv_pos, -1).amax(-1)
    listed = valid.any(-1)
    width = int(torch.where(listed, hi - lo + 1, 0).max())
    if width > kv_pos.shape[-1]:
        return None
    return torch.where(listed, lo, prefix), max(width, 1)


def _shared_prefix(kv_pos: torch.Tensor) -> int:
    """P such that every block visits all of [0, P) or none of it, plus keys >= P (0 if none fits):
    the attention sinks of a streaming pattern. P is the shortest leading run 0, 1, ... among the
    blocks whose keys are not one range."""
    valid = kv_pos >= 0
    keys = torch.where(valid, kv_pos, torch.iinfo(torch.int64).max).sort(-1).values
    lead = (keys == torch.arange(keys.shape[-1], device=keys.device)).cumprod(-1).sum(-1)
    count = valid.sum(-1)
    gapped = (keys.gather(-1, (count - 1).clamp(min=0)[:, None]).squeeze(-1) - keys[:, 0] + 1 != count) & (count > 0)
    if not bool(gapped.any()):
        return 0
    p = int(lead[gapped].min())
    below = (valid & (kv_pos < p)).sum(-1)
    return p if p and bool(((below == 0) | (below == p)).all()) else 0


def plans(layout: BlockLayout, dtype: torch.dtype, static: bool, split_prefix: bool = False) -> list[list[_Plan]]:
    """Per (layout batch, layout head) execution plans; cached on the layout for static patterns.
    ``split_prefix``: attend a shared prefix of keys separately (log-sum-exp merge, see :func:`_sdpa_rows`)."""
    key = ("gather", dtype, split_prefix)
    if static and key in layout.cache:
        return layout.cache[key]
    Bl, Hl = layout.kv_indices.shape[:2]
    kv_pos = layout.kv_tokens()
    result = [[_plan_for(layout, kv_pos[b, h], b, h, dtype, static, split_prefix) for h in range(Hl)] for b in range(Bl)]
    if static:
        layout.cache[key] = result
    return result


def _sdpa_rows(q, k, v, mask, scale: float, groups: int, with_lse: bool):
    """Fused SDPA over (B, Hq, L, D) queries and (B, Hkv, K, D) keys (any strides), mask
    broadcastable to (B, Hq, L, K) or None, GQA folded into rows; returns the output (B, Hq, L, Dv)
    and, with ``with_lse``, each row's log-sum-exp (B, Hq, L)."""
    B, Hq, L, _ = q.shape
    q, mask = fold_heads(q, mask, groups)
    if not with_lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).reshape(B, Hq, L, -1), None
    out, lse = additive_attention_with_lse(q, k, v, mask, scale=scale)
    return out.reshape(B, Hq, L, -1), lse.reshape(B, Hq, L)


_RUN_BLOCKS = 32  # query blocks per strided call: its output is a temporary, keep it a fraction of N


def _strided_runs(blocks: list[int], starts: list[int], bq: int, nq: int) -> list[tuple[int, int, int]]:
    """(first block index in the group, blocks, first key) of runs of full query blocks that advance
    by one block and ``bq`` keys at a time: each run is one SDPA call over overlapping key windows."""
    runs: list[tuple[int, int, int]] = []
    for i, (blk, s) in enumerate(zip(blocks, starts)):
        full = (blk + 1) * bq <= nq
        if (runs and full and i == runs[-1][0] + runs[-1][1] and runs[-1][1] < _RUN_BLOCKS
                and blk == blocks[i - 1] + 1 and s == starts[i - 1] + bq):
            first, n, s0 = runs[-1]
            runs[-1] = (first, n + 1, s0)
        else:
            runs.append((i, 1, s))
    return runs


def _windows(x: torch.Tensor, first: int, n: int, step: int, width: int) -> torch.Tensor:
    """(H, N, D) -> (n, H, width, D) view of the windows [first + i * step, ... + width), no copy."""
    H, _, D = x.shape
    sh, sn, sd = x.stride()
    return x.as_strided((n, H, width, D), (step * sn, sh, sn, sd), x.storage_offset() + first * sn)


def _run_slices(q, k, v, out, plan: _Plan, g: _Group, scale: float, groups: int, lse=None) -> None:
    """Band blocks: contiguous queries against a contiguous key range; q/k/v/out in (B, H, N, D),
    and each row's log-sum-exp into ``lse`` (B, H, N) when given. Consecutive blocks whose ranges
    advance with them share one SDPA call over a strided view of the keys (sliding windows)."""
    bq = plan.q_pos.shape[1]
    nq = out.shape[2]
    per_block_mask = g.mask is not None and g.mask.dim() == 3
    blocks, starts = g.blocks.tolist(), g.starts.tolist()
    runs = [(i, 1, s) for i, s in enumerate(starts)] if per_block_mask else _strided_runs(blocks, starts, bq, nq)
    for i, n, s in runs:
        a = blocks[i] * bq
        if n == 1:
            b = min(nq, a + bq)
            mask = g.mask[i] if per_block_mask else g.mask
            mask = None if mask is None else mask[: b - a]
            res, res_lse = _sdpa_rows(q[:, :, a:b], k[:, :, s : s + g.width], v[:, :, s : s + g.width], mask, scale, groups, lse is not None)
            out[:, :, a:b] = res
            if lse is not None:
                lse[:, :, a:b] = res_lse
            continue
        for row in range(q.shape[0]):
            H = q.shape[1]
            qw = q[row, :, a : a + n * bq].unflatten(1, (n, bq)).transpose(0, 1)  # (n, H, bq, D)
            kw, vw = _windows(k[row], s, n, bq, g.width), _windows(v[row], s, n, bq, g.width)
            res, res_lse = _sdpa_rows(qw, kw, vw, g.mask, scale, groups, lse is not None)
            out[row, :, a : a + n * bq].view(H, n, bq, -1).copy_(res.transpose(0, 1))
            if lse is not None:
                lse[row, :, a : a + n * bq].view(H, n, bq).copy_(res_lse.transpose(0, 1))


_PREFIX_ROWS = 4096  # rows merged at a time, so the merge's temporaries stay small


def _merge_prefix(q, k, v, out, lse, prefix: _Prefix, scale: float, groups: int) -> None:
    """Attend the prefix rows to keys [0, size) and merge with the range outputs by log-sum-exp."""
    if prefix.band_empty is not None:
        lse[:, :, prefix.band_empty] = float("-inf")
    kp, vp = k[:, :, : prefix.size], v[:, :, : prefix.size]
    for a in range(0, prefix.rows.numel(), _PREFIX_ROWS):
        rows = prefix.rows[a : a + _PREFIX_ROWS]
        mask = None if prefix.mask is None else prefix.mask[a : a + _PREFIX_ROWS]
        o_p, lse_p = _sdpa_rows(q[:, :, rows], kp, vp, mask, scale, groups, True)
        lse_p = lse_p.masked_fill(prefix.empty[a : a + _PREFIX_ROWS], float("-inf"))
        merged, merged_lse = merge_attention([out[:, :, rows], o_p], [lse[:, :, rows], lse_p])
        out[:, :, rows] = merged.to(out.dtype)
        lse[:, :, rows] = merged_lse.to(lse.dtype)


def _run_gathered(q_t, k_t, v_t, out_t, plan: _Plan, g: _Group, scale: float, groups: int, lse_t=None) -> None:
    """Gathered blocks; q_t (B, Nq, Hq, D), k_t/v_t (B, Nk, Hkv, D) token-major, writes out_t
    (B, Nq, Hq, Dv) and, when given, each row's log-sum-exp into ``lse_t`` (B, Nq, Hq)."""
    B, _, Hq, D = q_t.shape
    Hkv, Dv = k_t.shape[2], v_t.shape[3]
    bq = plan.q_pos.shape[1]
    gqa = {"enable_gqa": True} if groups > 1 else {}
    n = g.blocks.numel()
    step = max(1, _CHUNK_KEYS // g.width)
    per_block_mask = g.mask is not None and g.mask.dim() == 3
    for a in range(0, n, step):
        ids = g.blocks[a : a + step]
        c = ids.numel()
        qpos = plan.q_pos[ids]
        qb = q_t[:, qpos.clamp(min=0)].reshape(B * c, bq, Hq, D).transpose(1, 2)
        kpos = g.kv_pos[a : a + step]
        kb = k_t[:, kpos].reshape(B * c, g.width, Hkv, D).transpose(1, 2)
        vb = v_t[:, kpos].reshape(B * c, g.width, Hkv, Dv).transpose(1, 2)
        mask = g.mask
        if per_block_mask:
            mask = mask[a : a + step].repeat(B, 1, 1).unsqueeze(1)
        if lse_t is None:
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, **gqa)
        else:
            o, rows_lse = _sdpa_rows(qb, kb, vb, mask, scale, groups, True)
            rows_lse = rows_lse.transpose(1, 2).reshape(B, c * bq, Hq)
        o = o.transpose(1, 2).reshape(B, c * bq, Hq, Dv)
        flat = qpos.flatten()
        keep = flat >= 0
        if bool(keep.all()):
            out_t[:, flat] = o
            if lse_t is not None:
                lse_t[:, flat] = rows_lse
        else:
            out_t[:, flat[keep]] = o[:, keep]
            if lse_t is not None:
                lse_t[:, flat[keep]] = rows_lse[:, keep]


def can_run(q, k, v, layout: BlockLayout) -> str | None:
    """None when this executor runs ``layout`` (any layout without single key columns); else why not."""
    if layout.columns is not None:
        return "single key columns (they need key blocks of more than one token, the blocks executor)"
    return None


def gather_attention(q, k, v, layout: BlockLayout, *, scale: float, static: bool = True, return_lse: bool = False):
    """Block-sparse attention on CPU (or any device) through fused SDPA per block group.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv), each row's
    log-sum-exp (B, Hq, Nq) with ``return_lse`` (else None), and the counts of allowed and computed
    (query, key) entries. Rows with no allowed key return zeros (log-sum-exp -inf).
    """
    B, Hq, Nq, _ = q.shape
    Hkv, dtype = k.shape[1], q.dtype
    work = executor_dtype(q)
    q, k, v = q.to(work), k.to(work), v.to(work)
    Bl, Hl = layout.kv_indices.shape[:2]
    # attention sinks as a separate call merged by log-sum-exp: needs the CPU fused kernel (equal
    # q and v head sizes) and no autograd (its log-sum-exp output carries no gradient)
    split_prefix = (q.device.type == "cpu" and q.shape[-1] == v.shape[-1]
                    and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))
    all_plans = plans(layout, work, static, split_prefix)
    gathers = any(g.starts is None for row in all_plans for p in row for g in p.groups)
    sliced = layout.q_order is None and not gathers
    lse = None
    lse_dtype = work_dtype(q)
    if sliced:
        out = torch.empty(B, Hq, Nq, v.shape[-1], dtype=work, device=q.device)
        tq, tk, tv, tout, head_axis = q, k, v, out, 1
        if return_lse:  # rows no block visits keep -inf
            lse = torch.full((B, Hq, Nq), float("-inf"), dtype=lse_dtype, device=q.device)
        elif any(p.prefix is not None for row in all_plans for p in row):
            lse = torch.empty(B, Hq, Nq, dtype=lse_dtype, device=q.device)
    else:
        tq, tk, tv = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        tout = (tq.new_zeros if layout.q_order is not None else tq.new_empty)(B, Nq, Hq, v.shape[-1])
        head_axis = 2
        if return_lse:
            lse = torch.full((B, Nq, Hq), float("-inf"), dtype=lse_dtype, device=q.device)
    allowed = computed = 0
    for bl in range(Bl):
        bsl = slice(bl, bl + 1) if Bl > 1 else slice(None)
        for hl in range(Hl):
            if Hl > 1:
                kvh = hl // (Hq // Hkv)
                sel = [bsl] + [slice(None)] * (head_axis - 1)
                qs, os = tq[(*sel, slice(hl, hl + 1))], tout[(*sel, slice(hl, hl + 1))]
                ks, vs = tk[(*sel, slice(kvh, kvh + 1))], tv[(*sel, slice(kvh, kvh + 1))]
                ls = None if lse is None else lse[(*sel, slice(hl, hl + 1))]
                groups = 1
            else:
                qs, ks, vs, os, groups = tq[bsl], tk[bsl], tv[bsl], tout[bsl], Hq // Hkv
                ls = None if lse is None else lse[bsl]
            plan = all_plans[bl][hl]
            for grp in plan.groups:
                if sliced:
                    _run_slices(qs, ks, vs, os, plan, grp, scale, groups, ls)
                else:
                    _run_gathered(qs, ks, vs, os, plan, grp, scale, groups, ls)
            if plan.prefix is not None:
                _merge_prefix(qs, ks, vs, os, ls, plan.prefix, scale, groups)
            if plan.empty_rows is not None:
                rows = (slice(None), slice(None), plan.empty_rows) if sliced else (slice(None), plan.empty_rows)
                os[rows] = 0
                if return_lse:
                    ls[rows] = float("-inf")
            heads = 1 if Hl > 1 else Hq
            nb = 1 if Bl > 1 else B
            allowed += plan.allowed * heads * nb
            computed += plan.computed * heads * nb
    out = tout if sliced else tout.transpose(1, 2)
    if return_lse and not sliced:
        lse = lse.transpose(1, 2)
    return out.to(dtype), lse if return_lse else None, {"allowed": allowed, "computed": computed}
