"""Position-pattern methods: a per-token mask plus an analytic list of the keys each query block visits.

A subclass of :class:`PatternMethod` implements

* ``mask_mod(call)``: a function (b, h, q_idx, kv_idx) -> bool on original token indices (the
  pattern, in the FlexAttention form), and
* ``build_layout(call, q_block)``: which keys each query block visits, built analytically at a cost
  proportional to the number of visited blocks (never an N x N mask), and
* ``reference_mask(call)``: the same pattern written plainly from the paper, as an (H|1, Nq, Nk)
  boolean mask; the reference attention is dense softmax under that mask.

The shared executor (:mod:`attnzoo.kernels.block_sparse`) runs every pattern. Spatial methods
(:class:`SpatialMethod`) lay tokens out on a ``grid`` after ``num_global`` leading global tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InvalidArgumentError, UnsupportedError, check_int
from .kernels.block_sparse import BACKENDS, BlockLayout, Boxes2D, block_sparse_attention, choose_backend, membership, present_ids
from .kernels.dense import causal_mask, masked_attention, sdpa
from .method import Call, CallStats, Method

FLEX_BLOCK = 128


def causal_allowed(call: Call, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """Bottom-right aligned causality on original indices (query i sits at i + Nk - Nq)."""
    return kv_idx <= q_idx + (call.len_kv - call.len_q)


def dense_area(call: Call) -> float:
    """Entries of the dense (causal, where causal) score matrix of one head."""
    if not call.causal:
        return float(call.len_q * call.len_kv)
    off = call.len_kv - call.len_q
    rows = torch.arange(call.len_q, dtype=torch.float64) + off + 1
    return float(rows.clamp(min=0, max=call.len_kv).sum())


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


class PatternMethod(Method):
    """A method whose sparsity is fixed by token positions (family ``local``)."""

    backends = BACKENDS
    q_block = 64
    cached_layouts = 8  # most recent shapes kept; decoding meets a new key length every step

    def __init__(self, **config):
        super().__init__(**config)
        self._layouts: dict = {}

    # ---- for subclasses ---------------------------------------------------------------------
    def mask_mod(self, call: Call):  # pragma: no cover - abstract
        raise NotImplementedError

    def build_layout(self, call: Call) -> BlockLayout:  # pragma: no cover - abstract
        """The layout for the gather backend (kv_block 1 or a natural block size)."""
        raise NotImplementedError

    def reference_mask(self, call: Call) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- shared machinery -------------------------------------------------------------------
    def layout(self, call: Call, backend: str = "gather") -> BlockLayout:
        """The (cached) layout for this call's shapes, at the block size ``backend`` runs."""
        key = (call.len_q, call.len_kv, call.causal, call.heads_q, call.heads_kv, call.device, backend)
        layout = self._layouts.pop(key, None)
        if layout is None:
            layout = self.build_layout(call)
            layout.mask_mod = self.mask_mod(call)
            layout.covers_mask = True
            if backend == "flex":
                layout = coarsen(layout, FLEX_BLOCK)
            if len(self._layouts) >= self.cached_layouts:
                self._layouts.pop(next(iter(self._layouts)))
        self._layouts[key] = layout  # re-inserted last: least recently used first
        return layout

    def _forward(self, q, k, v, call: Call):
        backend = choose_backend(self.backend, call.device)
        layout = self.layout(call, backend)
        out, counts = block_sparse_attention(q, k, v, layout, scale=call.scale, backend=backend)
        return out, self._stats(call, backend, counts)

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        return masked_attention(q, k, v, self._support(q, k, v, call), scale=call.scale)

    def _support(self, q, k, v, call: Call) -> torch.Tensor:
        mask = self.reference_mask(call)
        return mask & causal_mask(call.len_q, call.len_kv, mask.device) if call.causal else mask

    def _stats(self, call: Call, backend: str, counts: dict) -> CallStats:
        area = dense_area(call) * call.batch * call.heads_q
        allowed = counts.get("allowed")
        return CallStats(
            self.info.name,
            backend,
            density=(allowed / area) if allowed is not None else counts["computed"] / area,
            extra={"computed_fraction": counts["computed"] / area},
        )

    def stats(self, call: Call) -> CallStats:
        backend = choose_backend(self.backend, call.device)
        layout = self.layout(call, backend)
        area = dense_area(call)
        visited = float(layout.kv_counts.float().sum(-1).mean()) * layout.q_block * layout.kv_block
        return CallStats(self.info.name, backend, density=min(1.0, visited / area))


@dataclass
class SpatialConfig:
    """Token layout shared by spatial methods: ``grid`` (H, W) or (T, H, W) or (N,), row-major,
    after ``num_global`` leading tokens that attend to and are attended by everything."""

    grid: tuple[int, ...] | None = None
    num_global: int = 0

    def __post_init__(self):
        self.num_global = check_int("num_global", self.num_global, minimum=0)
        if self.grid is not None:
            if isinstance(self.grid, int):
                self.grid = (self.grid,)
            if not isinstance(self.grid, (tuple, list)) or not 1 <= len(self.grid) <= 3:
                raise InvalidArgumentError("grid", "a tuple of 1 to 3 positive ints, e.g. (H, W)", repr(self.grid))
            self.grid = tuple(check_int(f"grid[{i}]", g) for i, g in enumerate(self.grid))


class SpatialMethod(PatternMethod):
    """A pattern on a token grid; global tokens are handled here once for every spatial method."""

    ndims: tuple[int, ...] = (1, 2, 3)

    def grid(self, call: Call) -> tuple[int, ...]:
        cfg = self.config
        n = call.len_q - cfg.num_global
        if cfg.grid is None:
            return (n,)
        return cfg.grid

    def check(self, call: Call) -> None:
        cfg = self.config
        n = call.len_q - cfg.num_global
        if n < 1:
            raise InvalidArgumentError("num_global", f"fewer than the {call.len_q} tokens", cfg.num_global)
        grid = self.grid(call)
        if math.prod(grid) != n:
            raise InvalidArgumentError(
                "grid", f"a product equal to N - num_global = {call.len_q} - {cfg.num_global} = {n}", f"{grid} (product {math.prod(grid)})"
            )
        if len(grid) not in self.ndims:
            raise UnsupportedError(f"method {self.info.name!r} supports {self.ndims}-D grids; got grid={grid}")
        if call.causal and cfg.num_global:
            raise UnsupportedError(f"method {self.info.name!r}: global tokens attend to everything, so causal=True needs num_global=0")
        self.check_grid(grid, call)

    def check_grid(self, grid: tuple[int, ...], call: Call) -> None:
        """Method-specific checks (kernel larger than the grid, divisibility, ...)."""

    # coordinates ---------------------------------------------------------------------------
    def coords(self, idx: torch.Tensor, grid: tuple[int, ...]) -> list[torch.Tensor]:
        """Original token index -> per-axis grid coordinates (global tokens give garbage; mask them)."""
        rest = idx - self.config.num_global
        out = []
        for n in reversed(grid):
            out.append(rest % n)
            rest = rest // n
        return out[::-1]

    def with_globals(self, call: Call, inner):
        """Wrap a grid mask (on per-axis coordinates) into a mask_mod on original indices."""
        G, grid = self.config.num_global, self.grid(call)

        def mask_mod(b, h, q_idx, kv_idx):
            allowed = inner(h, self.coords(q_idx, grid), self.coords(kv_idx, grid))
            if G:
                allowed = allowed | (q_idx < G) | (kv_idx < G)
            if call.causal:
                allowed = allowed & causal_allowed(call, q_idx, kv_idx)
            return allowed

        return mask_mod

    def embed_grid_mask(self, call: Call, grid_mask: torch.Tensor) -> torch.Tensor:
        """(n, n) mask over grid tokens -> (N, N) with the global tokens attending everywhere."""
        G = self.config.num_global
        full = torch.ones(call.len_q, call.len_kv, dtype=torch.bool)
        full[G:, G:] = grid_mask
        return full.to(call.device)

    def axes_product_mask(self, call: Call, axis_masks: list[torch.Tensor]) -> torch.Tensor:
        """Reference mask of a separable pattern: allowed iff allowed on every axis ((n_a, n_a) each)."""
        mask = torch.ones(1, 1, dtype=torch.bool)
        for axis in axis_masks:
            n = axis.shape[0]
            mask = (mask[:, None, :, None] & axis[None, :, None, :]).reshape(mask.shape[0] * n, -1)
        return self.embed_grid_mask(call, mask)

    def _forward(self, q, k, v, call: Call):
        out, stats = super()._forward(q, k, v, call)
        G = self.config.num_global
        if G:
            out[:, :, :G] = sdpa(q[:, :, :G], k, v, causal=False, scale=call.scale).to(out.dtype)
        return out, stats


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
