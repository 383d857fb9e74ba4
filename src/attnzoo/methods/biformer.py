"""BiFormer: bi-level routing attention (region-to-region top-k, then token attention)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError, check_int
from ..kernels.block_sparse import BlockLayout, block_sparse_attention, choose_backend
from ..kernels.dense import repeat_kv
from ..method import Call, CallStats, MethodInfo, _sync
from ..patterns import compact, dense_area
from ..registry import register
from ..selection import BlockSelectionMethod, block_means, clamp_budget, top_blocks


@register
class BiFormer(BlockSelectionMethod):
    """Bi-level routing attention ("BiFormer: Vision Transformer with Bi-Level Routing Attention",
    arXiv 2303.08125). The token grid (``grid`` (H, W), row-major; or a 1-D sequence) is split into
    ``n_win`` x ``n_win`` regions (``n_win`` chunks in 1-D); region queries and keys are the means
    of their tokens (over all heads: one routing for every head, as in the paper); each region
    routes to its ``topk`` regions of highest affinity, and its tokens attend to every token of
    those regions. Tokens are put in region-major order once and the block executor gathers the
    routed key/value regions chunk by chunk into reused buffers, so the k copies of the keys and
    values that BiFormer's own gather makes are never materialised. Non-causal self-attention.
    :meth:`selection` returns the region layout, in region-major token order (:meth:`region_order`).
    q (B, Hq, N, D), k/v (B, Hkv, N, D|Dv). ``topk`` above the number of regions is clamped (warning)."""

    info = MethodInfo(
        name="biformer", title="BiFormer: Vision Transformer with Bi-Level Routing Attention", arxiv="2303.08125",
        family=("dynamic",), causal=False, non_causal=True, cross=False, gqa=True, training_free=True,
        time="O(R^2 D + N k (N / R) D) for R regions", memory="O(N D + R^2) (no k-fold key/value copies)", spatial=True,
        summary="region-to-region top-k routing, then token attention inside the routed regions",
    )

    @dataclass
    class Config:
        n_win: int = 7
        topk: int = 4
        grid: tuple[int, ...] | None = None

        def __post_init__(self):
            self.n_win = check_int("n_win", self.n_win)
            self.topk = check_int("topk", self.topk)
            if self.grid is not None:
                if isinstance(self.grid, int):
                    self.grid = (self.grid,)
                if not isinstance(self.grid, (tuple, list)) or len(self.grid) not in (1, 2):
                    raise InvalidArgumentError("grid", "None, (N,) or (H, W)", repr(self.grid))
                self.grid = tuple(check_int(f"grid[{i}]", g) for i, g in enumerate(self.grid))

    def _grid(self, call: Call) -> tuple[int, ...]:
        return self.config.grid or (call.len_q,)

    def check(self, call: Call) -> None:
        grid = self._grid(call)
        if torch.Size(grid).numel() != call.len_q:
            raise InvalidArgumentError("grid", f"a product equal to the {call.len_q} tokens", grid)
        for axis, n in enumerate(grid):
            if n % self.config.n_win:
                raise InvalidArgumentError("n_win", f"a divisor of every grid side (grid {grid}, axis {axis} has {n})", self.config.n_win)

    def region_order(self, call: Call) -> torch.Tensor:
        """(N,) original token index at each position of the region-major order."""
        grid, s = self._grid(call), self.config.n_win
        idx = torch.arange(call.len_q, device=call.device).view(grid)
        if len(grid) == 1:
            return idx
        h, w = grid
        return idx.view(s, h // s, s, w // s).permute(0, 2, 1, 3).flatten()

    def routes(self, q, k, call: Call) -> torch.Tensor:
        """(B, 1, R, topk) routed regions of every region (shared by the heads), R = n_win ** ndim."""
        order = self.region_order(call)
        regions = self.config.n_win ** len(self._grid(call))
        size = call.len_q // regions
        qr = block_means(q[:, :, order], size)  # (B, Hq, R, D)
        kr = repeat_kv(block_means(k[:, :, order], size), call.groups)
        affinity = torch.einsum("bhrd,bhsd->brs", qr, kr)[:, None]
        return top_blocks(affinity, clamp_budget(self.info.name, "topk", self.config.topk, regions))

    def _layout(self, q, k, call: Call) -> BlockLayout:
        routes = self.routes(q, k, call)
        size = call.len_q // routes.shape[2]
        return compact(routes, call.len_q, call.len_kv, size, kv_block=size)

    def _forward(self, q, k, v, call: Call):
        start = time.perf_counter()
        layout = self._layout(q, k, call)
        order = self.region_order(call)
        _sync(call.device)
        selection_ms = (time.perf_counter() - start) * 1e3
        backend = choose_backend(self.backend, call.device)
        out_r, counts = block_sparse_attention(q[:, :, order], k[:, :, order], v[:, :, order], layout,
                                               scale=call.scale, backend=backend, static=False)
        out = torch.empty_like(out_r)
        out[:, :, order] = out_r
        visited = float(layout.kv_counts.float().mean()) * layout.q_block * layout.kv_block * layout.num_q_blocks
        return out, CallStats(self.info.name, backend, density=visited / dense_area(call), selection_ms=selection_ms, extra=counts)

    def _support_of(self, layout: BlockLayout, call: Call) -> torch.Tensor:
        order = self.region_order(call)
        mask = torch.empty_like(layout.dense_mask(call.len_q, call.len_kv))
        mask[:, :, order[:, None], order[None, :]] = layout.dense_mask(call.len_q, call.len_kv)
        return mask
