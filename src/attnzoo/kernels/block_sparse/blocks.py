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
  memory stays linear in N.

A ``mask_mod`` that is a :class:`CausalMask` is classified analytically (only the diagonal tiles
are evaluated), so planning a content-selected layout costs O(listed tiles); any other ``mask_mod``
is evaluated on every listed tile (once, cached, for static layouts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layout import BlockLayout

_CHUNK_KEYS = 16384  # gathered keys per SDPA call
_EVAL_TILES = 256  # tiles whose token masks are evaluated at once while planning


@dataclass(frozen=True)
class CausalMask:
    """Bottom-right aligned causality as a ``mask_mod``: key j is allowed for query i iff
    j <= i + offset (offset = Nk - Nq). The executor recognises it and classifies tiles without
    evaluating it."""

    offset: int

    def __call__(self, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + self.offset


def handles(layout: BlockLayout) -> bool:
    """Whether this executor runs ``layout``: key blocks of more than one token, natural order."""
    return layout.kv_block > 1 and layout.q_order is None and layout.kv_order is None and layout.boxes is None


@dataclass
class _Group:
    """Query blocks that share their tile structure: ids, key block ids (full tiles first), mask."""

    blocks: torch.Tensor  # (c,) query block ids
    keys: torch.Tensor  # (c, n) key block ids
    mask: torch.Tensor | None  # additive (q_block, n * kv_block), shared by the group
    empty_rows: torch.Tensor | None  # rows (within a block) with no allowed key: output 0


@dataclass
class _Plan:
    groups: list[_Group]
    allowed: int
    computed: int


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
    """Per listed tile: full (bool), empty (bool), and the token masks of the partial ones."""
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
        masks = _tile_masks(layout, bl, hl, qb[partial], kb[partial])
        return full, empty, masks
    full = torch.empty_like(ragged)
    empty = torch.empty_like(ragged)
    kept = []
    for a in range(0, qb.numel(), _EVAL_TILES):
        part = slice(a, a + _EVAL_TILES)
        m = _tile_masks(layout, bl, hl, qb[part], kb[part])
        pad_rows = torch.arange(bq, device=qb.device)[None, :] > (last - first)[part, None]
        full[part] = (m | pad_rows[:, :, None]).flatten(1).all(-1)  # padding columns are False
        empty[part] = ~m.flatten(1).any(-1)
        kept.append(m[~full[part] & ~empty[part]])
    return full, empty, torch.cat(kept)


def _plan_for(layout: BlockLayout, bl: int, hl: int, dtype: torch.dtype) -> _Plan:
    dev = layout.device
    bq, bk = layout.q_block, layout.kv_block
    nqb = layout.num_q_blocks
    valid = layout.slot_valid()[bl, hl]
    slot_q = torch.arange(nqb, device=dev)[:, None].expand_as(valid)[valid]
    slot_k = layout.kv_indices[bl, hl][valid]
    full, empty, masks = _classify(layout, bl, hl, slot_q, slot_k)
    partial = ~full & ~empty
    rows_real = ((slot_q + 1) * bq).clamp(max=layout.num_q) - slot_q * bq
    allowed = int((rows_real[full] * bk).sum()) + int(masks.sum())
    # partial tiles: one class per distinct token mask; padding rows may attend anywhere
    pad_rows = torch.arange(bq, device=dev)[None, :] >= rows_real[partial][:, None]
    exec_masks = (masks | pad_rows[:, :, None]).flatten(1)
    if exec_masks.shape[0]:
        classes, cls = torch.unique(exec_masks, dim=0, return_inverse=True)
    else:
        classes, cls = exec_masks, torch.zeros(0, dtype=torch.long, device=dev)
    # per query block: full key blocks in order, then partial ones sorted by class
    order_key = torch.full((slot_q.numel(),), -1, dtype=torch.long, device=dev)
    order_key[full] = 0
    order_key[partial] = cls + 1
    blocks_full = [[] for _ in range(nqb)]
    blocks_part = [[] for _ in range(nqb)]
    for q_id, k_id, key in zip(slot_q.tolist(), slot_k.tolist(), order_key.tolist()):
        if key == 0:
            blocks_full[q_id].append(k_id)
        elif key > 0:
            blocks_part[q_id].append((key - 1, k_id))
    signature: dict[tuple, list[int]] = {}
    for q_id in range(nqb):
        parts = sorted(blocks_part[q_id])
        if blocks_full[q_id] or parts:
            sig = (len(blocks_full[q_id]), tuple(c for c, _ in parts))
            blocks_part[q_id] = parts
            signature.setdefault(sig, []).append(q_id)
    groups = []
    computed = 0
    starts = torch.arange(nqb, device=dev) * bq
    block_rows = (starts + bq).clamp(max=layout.num_q) - starts
    cls_masks = classes.view(-1, bq, bk)
    for (n_full, part_cls), members in signature.items():
        keys = torch.tensor([blocks_full[i] + [k for _, k in blocks_part[i]] for i in members], dtype=torch.long, device=dev)
        ids = torch.tensor(members, dtype=torch.long, device=dev)
        computed += int(block_rows[ids].sum()) * keys.shape[1] * bk
        mask = empty_rows = None
        if part_cls:
            allowed_cells = torch.cat(
                [torch.ones(bq, n_full * bk, dtype=torch.bool, device=dev)] + [cls_masks[c] for c in part_cls], dim=1
            )
            none = ~allowed_cells.any(-1)
            if bool(none.any()):
                empty_rows = torch.nonzero(none).flatten()
                allowed_cells[none] = True  # attend anywhere, output set to 0 afterwards
            mask = torch.zeros(allowed_cells.shape, dtype=dtype, device=dev).masked_fill_(~allowed_cells, float("-inf"))
        groups.append(_Group(ids, keys, mask, empty_rows))
    return _Plan(groups, allowed, computed)


def _plans(layout: BlockLayout, dtype: torch.dtype, static: bool) -> list[list[_Plan]]:
    key = ("gather", "blocks", dtype)
    if static and key in layout.cache:
        return layout.cache[key]
    Bl, Hl = layout.kv_indices.shape[:2]
    result = [[_plan_for(layout, b, h, dtype) for h in range(Hl)] for b in range(Bl)]
    if static:
        layout.cache[key] = result
    return result


def _chunk(g: _Group, kv_block: int) -> int:
    """Query blocks of group ``g`` per SDPA call."""
    return max(1, _CHUNK_KEYS // (g.keys.shape[1] * kv_block))


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


def block_attention(q, k, v, layout: BlockLayout, *, scale: float, static: bool = True) -> tuple[torch.Tensor, dict]:
    """Block-granular sparse attention through fused SDPA on gathered key blocks.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv), plus the counts of
    allowed and computed (query, key) entries. Rows with no allowed key return zeros.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Dv, dtype = k.shape[1], v.shape[3], q.dtype
    work = q.dtype if (q.device.type != "cpu" or q.dtype in (torch.float32, torch.float64)) else torch.float32
    bq, bk = layout.q_block, layout.kv_block
    Bl, Hl = layout.kv_indices.shape[:2]
    groups = Hq // Hkv
    all_plans = _plans(layout, work, static)
    qb, kb, vb = _blocked(q.to(work), bq), _blocked(k.to(work), bk), _blocked(v.to(work), bk)
    out = torch.zeros(B, Hq, qb.shape[2], bq, Dv, dtype=work, device=q.device)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    width = 0
    for g in (g for row in all_plans for p in row for g in p.groups):
        c = min(g.blocks.numel(), _chunk(g, bk))
        width = max(width, c * g.keys.shape[1] * bk * max(D, Dv), c * bq * D)
    buffers = _Buffers(0 if grad else 3 * width, work, q.device)
    allowed = computed = 0
    for b in range(B):
        for h in range(Hq):
            plan = all_plans[b if Bl > 1 else 0][h if Hl > 1 else 0]
            kvh = h // groups
            for g in plan.groups:
                n, step = g.keys.shape[1], _chunk(g, bk)
                for a in range(0, g.blocks.numel(), step):
                    ids, keys = g.blocks[a : a + step], g.keys[a : a + step].flatten()
                    c = ids.numel()
                    qs = buffers.select(0, qb[b, h], ids, width).view(c, 1, bq, D)
                    ks = buffers.select(1, kb[b, kvh], keys, width).view(c, 1, n * bk, D)
                    vs = buffers.select(2, vb[b, kvh], keys, width).view(c, 1, n * bk, Dv)
                    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=g.mask, scale=scale).view(c, bq, Dv)
                    if g.empty_rows is not None:
                        o = o.index_fill(1, g.empty_rows, 0.0)
                    out[b, h].index_copy_(0, ids, o)
            allowed += plan.allowed
            computed += plan.computed
    out = out.view(B, Hq, -1, Dv)[:, :, :Nq]
    return out.to(dtype), {"allowed": allowed, "computed": computed}
