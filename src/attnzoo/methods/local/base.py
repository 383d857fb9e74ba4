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

from ...errors import InvalidArgumentError, UnsupportedError, check_int
from ...kernels.block_sparse import (
    BACKENDS,
    BlockLayout,
    block_sparse_attention,
    choose_backend,
)
from ...kernels.block_sparse.builders import FLEX_BLOCK, coarsen
from ...kernels.dense import attention_with_lse, causal_mask, masked_attention, sdpa
from ...masks import causal_allowed, evaluate
from ...method import Call, Method


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
    def layout(self, call: Call, backend: str = "torch") -> BlockLayout:
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
        if torch.compiler.is_compiling():
            return self._masked_forward(q, k, v, call)
        out, _, counts = self._run(q, k, v, call, return_lse=False)
        return out, self.call_stats(call, counts)

    def _forward_with_lse(self, q, k, v, call: Call):
        if torch.compiler.is_compiling():
            return attention_with_lse(q, k, v, scale=call.scale, mask=self._evaluated_mask(call))
        out, lse, _ = self._run(q, k, v, call, return_lse=True)
        return out, lse

    def _run(self, q, k, v, call: Call, return_lse: bool):
        """(out, lse or None, counts) from the block executor on this call's layout."""
        backend = choose_backend(self.backend, call.device)
        result = block_sparse_attention(q, k, v, self.layout(call, backend), scale=call.scale, backend=backend, return_lse=return_lse)
        return result if return_lse else (result[0], None, result[1])

    def _evaluated_mask(self, call: Call) -> torch.Tensor:
        return evaluate(self.mask_mod(call), call.heads_q, call.len_q, call.len_kv, call.device)

    def _masked_forward(self, q, k, v, call: Call) -> torch.Tensor:
        """One SDPA under the dense mask evaluated from ``mask_mod``: the path ``torch.compile`` traces
        (a full graph cannot hold the executors' data-dependent plans); O(Hq Nq Nk) memory."""
        return sdpa(q, k, v, causal=False, scale=call.scale, mask=self._evaluated_mask(call))

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        return masked_attention(q, k, v, self._support(q, k, v, call), scale=call.scale)

    def _support(self, q, k, v, call: Call) -> torch.Tensor:
        mask = self.reference_mask(call)
        return mask & causal_mask(call.len_q, call.len_kv, mask.device) if call.causal else mask


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

    def _run(self, q, k, v, call: Call, return_lse: bool):
        out, lse, counts = super()._run(q, k, v, call, return_lse)
        G = self.config.num_global
        if G:  # global queries attend to every key, in a dense call of their own
            rows = G * call.len_kv * call.batch * call.heads_q
            counts = {**counts, "computed": counts["computed"] + rows,
                      "allowed": None if counts.get("allowed") is None else counts["allowed"] + rows}
            if return_lse:
                out[:, :, :G], lse[:, :, :G] = attention_with_lse(q[:, :, :G], k, v, scale=call.scale)
            else:
                out[:, :, :G] = sdpa(q[:, :, :G], k, v, causal=False, scale=call.scale).to(out.dtype)
        return out, lse, counts


