"""BiFormer: bi-level routing attention (region-to-region top-k, then token attention)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnzoo.methods.dynamic.base import (
    DynamicMethod,
    RegionConfig,
    Selection,
    clamp_budget,
)

from ...errors import check_int
from ...kernels.block_sparse.builders import compact
from ...kernels.dense import repeat_kv
from ...method import Call, MethodInfo
from ...registry import register
from . import naive
from .scoring import block_means, region_order, top_blocks


@register
class BiFormer(DynamicMethod):
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
    class Config(RegionConfig):
        topk: int = 4

        def __post_init__(self):
            super().__post_init__()
            self.topk = check_int("topk", self.topk)

    def _grid(self, call: Call) -> tuple[int, ...]:
        return self.config.sides(call.len_q)

    def check(self, call: Call) -> None:
        self._grid(call)

    def region_order(self, call: Call) -> torch.Tensor:
        """(N,) original token index at each position of the region-major order."""
        return region_order(self._grid(call), self.config.n_win, call.device)

    def routes(self, q, k, call: Call) -> torch.Tensor:
        """(B, 1, R, topk) routed regions of every region (shared by the heads), R = n_win ** ndim."""
        order = self.region_order(call)
        regions = self.config.n_win ** len(self._grid(call))
        size = call.len_q // regions
        qr = block_means(q[:, :, order], size)  # (B, Hq, R, D)
        kr = repeat_kv(block_means(k[:, :, order], size), call.groups)
        affinity = torch.einsum("bhrd,bhsd->brs", qr, kr)[:, None]
        return top_blocks(affinity, clamp_budget(self.info.name, "topk", self.config.topk, regions))

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        support = naive.biformer_support(q, k, n_win=self.config.n_win, topk=self.config.topk, grid=self.config.grid)
        return naive.support_reference(q, k, v, support, call.scale)

    def plan(self, q, k, call: Call) -> Selection:
        """Routed regions as key blocks of the region-major token order."""
        routes = self.routes(q, k, call)
        size = call.len_q // routes.shape[2]
        order = self.region_order(call)
        return Selection(compact(routes, call.len_q, call.len_kv, size, kv_block=size), order, order)
