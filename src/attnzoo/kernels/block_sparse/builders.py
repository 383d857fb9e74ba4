"""Generic builders of :class:`~.layout.BlockLayout` objects: 1-D key ranges, N-D boxes of keys
for tiles of a grid, key lists with holes, and re-blocking for fixed-block backends. Each costs
time proportional to the entries it lists, never an N x N mask."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .layout import BlockLayout, membership, present_ids
from .strip import Boxes2D

if TYPE_CHECKING:
    from ...method import Call


FLEX_BLOCK = 128


def coarsen(layout: BlockLayout, block: int) -> BlockLayout:
    """Re-express a fine layout (kv_block 1, tiles of ``q_block`` queries) at block size ``block``,
    for backends with fixed block sizes (FlexAttention).

    Coarse query block i is fine blocks [i*m, (i+1)*m) with m = block // q_block, and visits the
    union of their keys. Keys are visited in the query order (tiles stay tiles) after any keys the
    queries do not cover (global tokens). Cost: proportional to the listed entries.
    """
    dev = layout.device
    m = max(1, block // layout.q_block)
    nqb = layout.num_q_blocks
    n_coarse = -(-nqb // m)
    # visiting order of keys: tokens not in q_order first (globals), then q_order without holes
    if layout.kv_block > 1:
        if layout.kv_order is not None or layout.q_order is not None or block % layout.kv_block:
            raise ValueError(f"coarsen: key blocks of {layout.kv_block} need natural order and a multiple target block; got {block}")
        kv_order = None
        rank = torch.arange(layout.num_kv_blocks, device=dev) * layout.kv_block
    elif layout.q_order is None:
        kv_order = None
        rank = torch.arange(layout.num_kv, device=dev)
    else:
        covered = layout.q_order[layout.q_order >= 0]
        seen = torch.zeros(layout.num_kv, dtype=torch.bool, device=dev)
        seen[covered] = True
        kv_order = torch.cat([torch.nonzero(~seen).flatten(), covered])
        rank = torch.empty_like(kv_order)
        rank[kv_order] = torch.arange(kv_order.numel(), device=dev)
    keys = torch.where(layout.slot_valid(), rank[layout.kv_indices], -1) // block  # -1 // b = -1
    pad = n_coarse * m - nqb
    if pad:
        keys = torch.cat([keys, keys.new_full((*keys.shape[:2], pad, keys.shape[3]), -1)], dim=2)
    keys = keys.view(*keys.shape[:2], n_coarse, -1)
    nkb = -(-layout.num_kv // block)
    order, counts = present_ids(membership(keys, nkb))
    q_order = layout.q_order
    if q_order is not None and pad * layout.q_block:
        q_order = torch.cat([q_order, q_order.new_full((n_coarse * m * layout.q_block - q_order.numel(),), -1)])
    return BlockLayout(
        layout.num_q if q_order is None else q_order.numel(), layout.num_kv, m * layout.q_block, block,
        order, counts, layout.mask_mod, q_order, kv_order, covers_mask=layout.covers_mask,
    )


def range_layout(call: Call, q_block: int, lo, hi, sinks: int = 0) -> BlockLayout:
    """1-D layout where query position p visits keys [lo(p), hi(p)) plus the first ``sinks`` keys.

    ``lo`` and ``hi`` map absolute query positions (bottom-right aligned: index + Nk - Nq), an
    (nQB,) tensor, to key positions of shape (nQB,) or, for a range per head, (H, nQB); they must
    be non-decreasing in p. A block visits the union of its queries' ranges.
    """
    dev = call.device
    nqb = -(-call.len_q // q_block)
    first = torch.arange(nqb, device=dev) * q_block
    last = (first + q_block).clamp(max=call.len_q) - 1
    off = call.len_kv - call.len_q
    start = lo(first + off).clamp(min=0, max=call.len_kv)
    stop = hi(last + off).clamp(min=0, max=call.len_kv)
    start, stop = torch.broadcast_tensors(start, stop)
    if sinks:
        start = torch.where(start <= sinks, torch.zeros_like(start), start)
    # listed keys, already compact: the sinks (where the range does not reach them), then the range
    n_sinks = torch.where(start > 0, min(sinks, call.len_kv), 0)
    counts = n_sinks + (stop - start).clamp(min=0)
    slot = torch.arange(max(int(counts.max()), 1) if nqb else 1, device=dev)
    keys = (start - n_sinks)[..., None] + slot  # the range, shifted past the sinks (one full-size pass)
    torch.where(slot < n_sinks[..., None], slot, keys, out=keys)
    keys.masked_fill_(slot >= counts[..., None], 0)
    while keys.dim() < 4:
        keys, counts = keys.unsqueeze(0), counts.unsqueeze(0)
    return BlockLayout(call.len_q, call.len_kv, q_block, 1, keys.contiguous(), counts)


def compact(keys: torch.Tensor, num_q: int, num_kv: int, q_block: int, kv_block: int = 1, **kw) -> BlockLayout:
    """Key lists (…, nQB, K) with -1 holes (token ids, or block ids with ``kv_block`` > 1) -> a
    layout with the holes moved last."""
    while keys.dim() < 4:
        keys = keys.unsqueeze(0)
    valid = keys >= 0
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
    keys = torch.gather(keys, -1, order).clamp(min=0)
    counts = valid.sum(-1)
    width = max(int(counts.max()), 1) if counts.numel() else 1
    return BlockLayout(num_q, num_kv, q_block, kv_block, keys[..., :width].contiguous(), counts, **kw)


def tile_shape(grid: tuple[int, ...], target: int | None = None) -> tuple[int, ...]:
    """A query tile of about ``target`` tokens, square-ish, no larger than the grid (last axis widest).

    The default is 16 tokens on 2-D grids (the strip executor reads boxes without gathering, so a
    small box wins: a 128 x 128 grid with a 13 x 13 window ran about 1.3x faster on 4 x 4 tiles than
    on 8 x 8 at 2 CPU threads) and 64 elsewhere (a gathered box costs a copy per tile).
    """
    if target is None:
        target = 16 if len(grid) == 2 else 64
    tile = [1] * len(grid)
    while math.prod(tile) < target:
        grown = False
        for a in range(len(grid) - 1, -1, -1):
            if tile[a] < grid[a] and math.prod(tile) < target:
                tile[a] = min(grid[a], tile[a] * 2)
                grown = True
        if not grown:
            break
    return tuple(tile)


def box_layout(grid: tuple[int, ...], num_global: int, tile: tuple[int, ...], spans, device) -> BlockLayout:
    """Tiled N-D layout: query tiles in tile-major order, each visiting the box of keys that is the
    union of its queries' windows, plus the global tokens.

    ``spans[a](c)`` maps coordinates c (int64 tensor) on axis a to (lo, hi): the key range of a
    query at c; a tile visits [min lo, max hi) over its queries. Cost: proportional to visited
    entries.
    """
    nd = len(grid)
    per_axis_tiles = [-(-n // t) for n, t in zip(grid, tile)]
    # query tokens of each tile, tile-major, row-major inside a tile
    q_coords, key_ranges = [], []
    for a in range(nd):
        starts = torch.arange(per_axis_tiles[a], device=device) * tile[a]
        c = starts[:, None] + torch.arange(tile[a], device=device)  # (tiles_a, tile_a)
        real = c < grid[a]
        q_coords.append(torch.where(real, c, -1))
        lo, hi = spans[a](c.clamp(max=grid[a] - 1))
        lo = torch.where(real, lo, grid[a]).amin(1)
        hi = torch.where(real, hi, 0).amax(1)
        key_ranges.append((lo.clamp(min=0), hi.clamp(max=grid[a])))
    # broadcast per-axis pieces to (tiles..., within-tile...) and flatten
    strides = [math.prod(grid[a + 1 :]) for a in range(nd)]

    def combine(pieces, sizes_inner):
        """pieces[a]: (tiles_a, inner_a) -> flat (prod tiles, prod inner) index, -1 if any axis is -1."""
        total, bad = 0, None
        for a, p in enumerate(pieces):
            shape = [1] * (2 * nd)
            shape[a], shape[nd + a] = p.shape[0], p.shape[1]
            pa = p.view(shape)
            total = total + pa.clamp(min=0) * strides[a]
            bad = (pa < 0) if bad is None else bad | (pa < 0)
        flat = torch.where(bad, -1, total + num_global)
        return flat.reshape(math.prod(per_axis_tiles), sizes_inner)

    q_tok = combine(q_coords, math.prod(tile))
    widths = [int((hi - lo).max()) for lo, hi in key_ranges]
    k_coords = []
    for a, (lo, hi) in enumerate(key_ranges):
        c = lo[:, None] + torch.arange(widths[a], device=device)
        k_coords.append(torch.where(c < hi[:, None], c, -1))
    keys = combine(k_coords, math.prod(widths))
    if num_global:
        keys = torch.cat([torch.arange(num_global, device=device).expand(keys.shape[0], -1), keys], dim=1)
    q_order = q_tok.flatten()  # -1 marks the padding of ragged edge tiles
    full_tiles = all(n % t == 0 for n, t in zip(grid, tile))
    if num_global == 0 and q_order.numel() == math.prod(grid) and bool((q_order == torch.arange(q_order.numel(), device=device)).all()):
        q_order = None  # 1-D or full-width tiles: the natural order, which lets bands run as slices
    if q_order is None:
        return compact(keys, math.prod(grid), math.prod(grid), math.prod(tile))
    boxes = None
    if nd == 2 and num_global == 0 and full_tiles:
        starts = [tuple((lo.clamp(max=n - w)).tolist()) for (lo, _), n, w in zip(key_ranges, grid, widths)]
        boxes = Boxes2D(grid, tile, starts[0], widths[0], starts[1], widths[1])
    return compact(keys, q_order.numel(), num_global + math.prod(grid), math.prod(tile), q_order=q_order, boxes=boxes)
