"""CPU executor for block-granular layouts: each query block against its own list of key blocks.

Content-selected layouts (MInference's vertical-slash and block-sparse, HiP, ...) and block patterns
(S2-Attention) list whole key blocks of ``kv_block`` tokens, a different list per batch, head and
query block. This executor runs them as batched fused SDPA calls:

* every listed (query block, key block) tile is classified once: *full* (every entry allowed),
  *empty* (dropped) or *partial* (the causal diagonal, a ragged last block, a finer ``mask_mod``);
* query blocks with the same number of full tiles and the same partial tile masks form a group; in
  each query block the full tiles come first and the partial ones last, so the whole group shares
  one broadcast additive mask (no mask at all where nothing is partial), which torch's CPU kernel
  runs at nearly the speed of no mask;
* a chunk of a group gathers its key and value blocks with one ``index_select`` into buffers that
  are allocated once per call and refilled (a fresh multi-MB tensor per chunk costs its page faults);
  memory stays linear in N;
* a layout's single key ``columns`` are attended separately (:mod:`.columns`) and merged by
  log-sum-exp, which the CPU flash kernel returns alongside its output.

A ``mask_mod`` that is a :class:`CausalMask` is classified analytically (only the diagonal tiles
are evaluated), so planning a content-selected layout costs O(listed tiles); any other ``mask_mod``
is evaluated on every listed tile (once, cached, for static layouts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...masks import CausalMask
from ..dense import (
    additive_attention_with_lse,
    additive_mask,
    executor_dtype,
    merge_attention,
    work_dtype,
)
from .columns import column_attention
from .layout import BlockLayout

_CHUNK_KEYS = 131072  # gathered keys per SDPA call (32 MB buffers at D = 64; fewer, larger calls)
_EVAL_TILES = 256  # tiles whose token masks are evaluated at once while planning


def can_run(q, k, v, layout: BlockLayout) -> str | None:
    """None when this executor runs ``layout`` (key blocks of more than one token, natural order);
    else why not."""
    if layout.kv_block == 1:
        return "key blocks of one token"
    if layout.q_order is not None or layout.kv_order is not None:
        return "a visiting order (q_order / kv_order)"
    return None


@dataclass
class _Group:
    """Query blocks that share their tile structure (full tiles first), hence one mask.

    ``members`` holds, per layout entry (batch bl, head hl), its query block ids (c,) and key block
    ids (c, n); the executor expands an entry to the batch rows and heads that share it."""

    width: int  # n, key blocks per query block
    mask: torch.Tensor | None  # additive (q_block, n * kv_block), or None where every tile is full
    empty_rows: torch.Tensor | None  # rows (within a block) with no allowed key: output 0
    members: list[tuple[int, int, torch.Tensor, torch.Tensor]]


@dataclass
class _Plan:
    groups: list[_Group]
    allowed: list[list[int]]  # per layout entry
    computed: list[list[int]]


def _tile_extent(layout: BlockLayout, qb: torch.Tensor, kb: torch.Tensor):
    """Original token indices of tiles (qb, kb): queries (t, bq, 1) and keys (t, 1, bk), with -1
    where a ragged last block runs past the sequence."""
    bq, bk = layout.q_block, layout.kv_block
    rows = qb[:, None, None] * bq + torch.arange(bq, device=qb.device)[None, :, None]
    cols = kb[:, None, None] * bk + torch.arange(bk, device=kb.device)[None, None, :]
    return torch.where(rows < layout.num_q, rows, -1), torch.where(cols < layout.num_kv, cols, -1)


def _tile_masks(layout: BlockLayout, bl: int, hl: int, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """(t, bq, bk) allowed entries of tiles (qb, kb); padding rows and columns are False."""
    rows, cols = _tile_extent(layout, qb, kb)
    dev = qb.device
    return layout.token_mask(rows, cols, torch.tensor(bl, device=dev), torch.tensor(hl, device=dev))


def _classify(layout: BlockLayout, bl: int, hl: int, qb: torch.Tensor, kb: torch.Tensor):
    """Per listed tile: full (bool), empty (bool); then the distinct token masks of the partial
    tiles (m, bq, bk), each partial tile's mask index (p,), and one partial tile per mask (m,)."""
    bq, bk = layout.q_block, layout.kv_block
    first = qb * bq
    last = ((qb + 1) * bq).clamp(max=layout.num_q) - 1
    lo = kb * bk
    ragged = (kb + 1) * bk > layout.num_kv
    hi = ((kb + 1) * bk).clamp(max=layout.num_kv) - 1
    mm = layout.mask_mod
    if mm is None or isinstance(mm, CausalMask):
        if mm is None:
            full, empty = ~ragged, torch.zeros_like(ragged)
        else:
            full = (hi <= first + mm.offset) & ~ragged
            empty = lo > last + mm.offset
        partial = ~full & ~empty
        # a partial tile's mask depends only on the diagonal's shift and the real rows and columns
        shift = (lo - first - mm.offset) if mm is not None else torch.zeros_like(lo)
        sig = torch.stack([shift, last - first, hi - lo], 1)[partial]
        distinct, inverse = torch.unique(sig, dim=0, return_inverse=True)
        order = torch.arange(inverse.numel(), device=qb.device)
        rep = torch.full((distinct.shape[0],), inverse.numel(), device=qb.device).scatter_reduce_(0, inverse, order, "amin")
        masks = _tile_masks(layout, bl, hl, qb[partial][rep], kb[partial][rep])
        return full, empty, masks, inverse, rep
    full = torch.empty_like(ragged)
    empty = torch.empty_like(ragged)
    kept = [torch.zeros(0, bq, layout.kv_block, dtype=torch.bool, device=qb.device)]  # an entry may list no tile
    for a in range(0, qb.numel(), _EVAL_TILES):
        part = slice(a, a + _EVAL_TILES)
        m = _tile_masks(layout, bl, hl, qb[part], kb[part])
        pad_rows = torch.arange(bq, device=qb.device)[None, :] > (last - first)[part, None]
        full[part] = (m | pad_rows[:, :, None]).flatten(1).all(-1)  # padding columns are False
        empty[part] = ~m.flatten(1).any(-1)
        kept.append(m[~full[part] & ~empty[part]])
    masks = torch.cat(kept)
    each = torch.arange(masks.shape[0], device=qb.device)
    return full, empty, masks, each, each


def _tiles(layout: BlockLayout, bl: int, hl: int):
    """Listed tiles of one layout entry, classified: query and key block ids, full, partial, the
    distinct token masks of the partial tiles and each partial tile's mask index, and the
    allowed-entry count."""
    bq, bk = layout.q_block, layout.kv_block
    valid = layout.slot_valid()[bl, hl]
    slot_q = torch.arange(layout.num_q_blocks, device=layout.device)[:, None].expand_as(valid)[valid]
    slot_k = layout.kv_indices[bl, hl][valid]
    full, empty, masks, inverse, rep = _classify(layout, bl, hl, slot_q, slot_k)
    rows_real = ((slot_q + 1) * bq).clamp(max=layout.num_q) - slot_q * bq
    allowed = int((rows_real[full] * bk).sum()) + int(masks.flatten(1).sum(1)[inverse].sum())
    partial = ~full & ~empty
    pad_rows = torch.arange(bq, device=layout.device)[None, :] >= rows_real[partial][rep][:, None]
    return slot_q, slot_k, full, partial, masks | pad_rows[:, :, None], inverse, allowed


def _signatures(nqb: int, slot_q, slot_k, full, partial, classes) -> dict[tuple, tuple[list[int], list[list[int]]]]:
    """Group the query blocks of one entry by (full tiles, partial tile classes); keys full first,
    then partial ones by class."""
    key = torch.full((slot_q.numel(),), -1, dtype=torch.long, device=slot_q.device)
    key[full] = 0
    key[partial] = classes + 1
    full_keys: list[list[int]] = [[] for _ in range(nqb)]
    part_keys: list[list[tuple[int, int]]] = [[] for _ in range(nqb)]
    for q_id, k_id, c in zip(slot_q.tolist(), slot_k.tolist(), key.tolist()):
        if c == 0:
            full_keys[q_id].append(k_id)
        elif c > 0:
            part_keys[q_id].append((c - 1, k_id))
    groups: dict[tuple, tuple[list[int], list[list[int]]]] = {}
    for q_id in range(nqb):
        parts = sorted(part_keys[q_id])
        if full_keys[q_id] or parts:
            ids, keys = groups.setdefault((len(full_keys[q_id]), tuple(c for c, _ in parts)), ([], []))
            ids.append(q_id)
            keys.append(full_keys[q_id] + [k for _, k in parts])
    return groups


def _plan(layout: BlockLayout, dtype: torch.dtype) -> _Plan:
    dev = layout.device
    bq, bk = layout.q_block, layout.kv_block
    Bl, Hl = layout.kv_indices.shape[:2]
    entries = [(bl, hl, *_tiles(layout, bl, hl)) for bl in range(Bl) for hl in range(Hl)]
    # one class per distinct partial tile mask, over all entries
    every = torch.cat([e[6].flatten(1) for e in entries])  # each entry's distinct masks
    if every.shape[0]:
        class_masks, class_ids = torch.unique(every, dim=0, return_inverse=True)
    else:
        class_masks, class_ids = every, torch.zeros(0, dtype=torch.long, device=dev)
    class_masks = class_masks.view(-1, bq, bk)
    starts = torch.arange(layout.num_q_blocks, device=dev) * bq
    block_rows = (starts + bq).clamp(max=layout.num_q) - starts
    allowed = [[0] * Hl for _ in range(Bl)]
    computed = [[0] * Hl for _ in range(Bl)]
    merged: dict[tuple, list] = {}
    used = 0
    for bl, hl, slot_q, slot_k, full, partial, masks, inverse, n_allowed in entries:
        classes, used = class_ids[used : used + masks.shape[0]][inverse], used + masks.shape[0]
        allowed[bl][hl] = n_allowed
        for sig, (ids, keys) in _signatures(layout.num_q_blocks, slot_q, slot_k, full, partial, classes).items():
            ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
            computed[bl][hl] += int(block_rows[ids_t].sum()) * len(keys[0]) * bk
            merged.setdefault(sig, []).append((bl, hl, ids_t, torch.tensor(keys, dtype=torch.long, device=dev)))
    groups = []
    for (n_full, part_cls), members in merged.items():
        mask = empty_rows = None
        if part_cls:
            cells = torch.cat([torch.ones(bq, n_full * bk, dtype=torch.bool, device=dev)] + [class_masks[c] for c in part_cls], dim=1)
            none = ~cells.any(-1)
            if bool(none.any()):
                empty_rows = torch.nonzero(none).flatten()
                cells[none] = True  # attend anywhere, output set to 0 afterwards
            mask = additive_mask(cells, dtype)
        groups.append(_Group(n_full + len(part_cls), mask, empty_rows, members))
    return _Plan(groups, allowed, computed)


def _cached_plan(layout: BlockLayout, dtype: torch.dtype, static: bool) -> _Plan:
    key = ("gather", "blocks", dtype)
    if static and key in layout.cache:
        return layout.cache[key]
    plan = _plan(layout, dtype)
    if static:
        layout.cache[key] = plan
    return plan


def _chunk(width: int, kv_block: int) -> int:
    """Query blocks per SDPA call when each visits ``width`` key blocks."""
    return max(1, _CHUNK_KEYS // (width * kv_block))


def _expand(members, B: int, Hq: int, Hkv: int, Bl: int, Hl: int, nqb: int, nkb: int):
    """Members of a group -> flat query block ids into (B * Hq * nQB) and key block ids (rows of n)
    into (B * Hkv * nKB), for every batch row and head that shares each layout entry."""
    groups = Hq // Hkv
    q_ids, k_ids = [], []
    for bl, hl, ids, keys in members:
        b = torch.arange(B, device=ids.device) if Bl == 1 else torch.tensor([bl], device=ids.device)
        h = torch.arange(Hq, device=ids.device) if Hl == 1 else torch.tensor([hl], device=ids.device)
        q_pair = (b[:, None] * Hq + h[None, :]).flatten()
        kv_pair = (b[:, None] * Hkv + h[None, :] // groups).flatten()
        q_ids.append((q_pair[:, None] * nqb + ids[None, :]).flatten())
        k_ids.append((kv_pair[:, None, None] * nkb + keys[None]).flatten(0, 1))
    return torch.cat(q_ids), torch.cat(k_ids)


def _blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, nBlocks, block, D), zero-padding a ragged last block."""
    pad = -x.shape[2] % block
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.view(*x.shape[:2], -1, block, x.shape[-1])


class _Buffers:
    """Gather targets allocated once per call and refilled chunk after chunk."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device):
        self.store = torch.empty(size, dtype=dtype, device=device) if size else None

    def select(self, slot: int, src: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
        """``src.index_select(0, index)`` written into buffer ``slot`` of ``width`` elements."""
        if self.store is None:
            return src.index_select(0, index)
        shape = (index.numel(), *src.shape[1:])
        n = index.numel() * src[0].numel()
        out = self.store[slot * width : slot * width + n].view(shape)
        return torch.index_select(src, 0, index, out=out)


def block_attention(q, k, v, layout: BlockLayout, *, scale: float, static: bool = True, return_lse: bool = False):
    """Block-granular sparse attention through fused SDPA on gathered key blocks, plus the
    layout's single key columns.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv), each row's
    log-sum-exp (B, Hq, Nq) with ``return_lse`` (else None), and the counts of allowed and computed
    (query, key) entries. Rows with no allowed key return zeros (log-sum-exp -inf).
    """
    B, Hq, Nq, D = q.shape
    Hkv, Dv, dtype = k.shape[1], v.shape[3], q.dtype
    work = executor_dtype(q)
    bq, bk = layout.q_block, layout.kv_block
    Bl, Hl = layout.kv_indices.shape[:2]
    plan = _cached_plan(layout, work, static)
    qb, kb, vb = (_blocked(x.to(work), blk).flatten(0, 2) for x, blk in ((q, bq), (k, bk), (v, bk)))
    nqb, nkb = layout.num_q_blocks, layout.num_kv_blocks
    out = torch.zeros(B * Hq * nqb, bq, Dv, dtype=work, device=q.device)
    columns = layout.columns is not None
    with_lse = columns or return_lse
    lse = torch.full((B * Hq * nqb, bq), float("-inf"), dtype=work_dtype(q), device=q.device) if with_lse else None
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    width = 0
    for g in plan.groups:
        total = sum(m[2].numel() for m in g.members) * (B if Bl == 1 else 1) * (Hq if Hl == 1 else 1)
        c = min(total, _chunk(g.width, bk))
        width = max(width, c * g.width * bk * max(D, Dv), c * bq * D)
    buffers = _Buffers(0 if grad else 3 * width, work, q.device)
    for g in plan.groups:
        q_ids, k_ids = _expand(g.members, B, Hq, Hkv, Bl, Hl, nqb, nkb)
        n, step = g.width, _chunk(g.width, bk)
        for a in range(0, q_ids.numel(), step):
            ids, keys = q_ids[a : a + step], k_ids[a : a + step].flatten()
            c = ids.numel()
            qs = buffers.select(0, qb, ids, width).view(c, 1, bq, D)
            ks = buffers.select(1, kb, keys, width).view(c, 1, n * bk, D)
            vs = buffers.select(2, vb, keys, width).view(c, 1, n * bk, Dv)
            if with_lse:
                o, rows = additive_attention_with_lse(qs, ks, vs, g.mask, scale=scale)
            else:
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=g.mask, scale=scale)
            o = o.view(c, bq, Dv)
            if g.empty_rows is not None:
                o = o.index_fill(1, g.empty_rows, 0.0)
            out.index_copy_(0, ids, o)
            if with_lse:
                rows = rows.view(c, bq)
                lse.index_copy_(0, ids, rows if g.empty_rows is None else rows.index_fill(1, g.empty_rows, float("-inf")))
    share = (B if Bl == 1 else 1) * (Hq if Hl == 1 else 1)
    allowed = sum(map(sum, plan.allowed)) * share
    computed = sum(map(sum, plan.computed)) * share
    out = out.view(B, Hq, -1, Dv)[:, :, :Nq]
    if with_lse:
        lse = lse.view(B, Hq, -1)[:, :, :Nq]
    if columns:
        col_out, col_lse, col_allowed = column_attention(q.to(work), k.to(work), v.to(work), layout, scale=scale)
        out, lse = merge_attention([out, col_out], [lse, col_lse])
        allowed += col_allowed
        computed += Nq * layout.columns.shape[-1] * B * Hq
    return out.to(dtype), lse if return_lse else None, {"allowed": allowed, "computed": computed}
