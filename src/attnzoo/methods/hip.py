"""HiP attention: hierarchically pruned top-k key blocks found by a tree search."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_int
from ..kernels.dense import repeat_kv
from ..method import Call, MethodInfo
from ..registry import register
from ..selection import (
    BlockSelectionMethod, TopKConfig, block_means, clamp_budget, forced_blocks, last_key_block, sample_rows, unique_blocks,
)


_QUERY_CHUNK = 256  # query blocks searched at once: the gathered representatives stay in cache
_GATHERED = 1 << 22  # at most this many representative key elements gathered at once (16 MB)


@register
class HiP(BlockSelectionMethod):
    """HiP attention ("HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention
    Pruning", arXiv 2406.09827): each query block (``block_size`` queries, mean-pooled) finds its
    ``top_k`` key blocks by a tree search. The visible key blocks are split into ``top_k`` ranges
    (every block is in one, so none is unreachable); each step halves every range, scores each half
    by the pooled query against the pooled key of the half's middle block (attention locality: one
    representative per branch) and keeps the ``top_k`` best halves, until every range is one block.
    The first block (attention sinks) and, when causal, the diagonal block and the ``local_blocks``
    before it are always visited, besides the ``top_k`` found.
    ``query_samples`` r > 0 scores a branch by the largest logit between r evenly spaced queries of
    the block and every key token of the representative block, instead of mean query against mean
    key (HiP max-pools token scores over the query block), which finds a single strong key that
    the means blur. ``key_block_size`` (default ``block_size``) sets the key granularity on its
    own: HiP's reference code sizes query and key blocks separately, with key blocks of a few
    tokens and many branches, which gives a lone key a better chance to survive the first levels of
    the search (``local_blocks`` then counts key blocks). q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv). Selection O((N / b) max(r, 1) k log(N / b) D),
    i.e. O(N log N); attention O(N k b D). ``top_k`` above the number of key blocks is clamped
    (warning)."""

    info = MethodInfo(
        name="hip", title="HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning",
        arxiv="2406.09827", family=("dynamic",), causal=True, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(N k log(N) D / b + N k b D)", memory="O(N k D / b + N k b) per head",
        summary="hierarchical top-k pruning: a tree search over key blocks, O(N log N) selection",
    )

    @dataclass
    class Config(TopKConfig):
        query_samples: int = 0
        key_block_size: int | None = None

        def __post_init__(self):
            super().__post_init__()
            self.query_samples = check_int("query_samples", self.query_samples, minimum=0)
            if self.key_block_size is not None:
                self.key_block_size = check_int("key_block_size", self.key_block_size, minimum=2)

    def kv_block(self, call: Call) -> int:
        return self.config.key_block_size or self.config.block_size

    def _select(self, q, k, call: Call) -> torch.Tensor:
        bq, bk = self.config.block_size, self.kv_block(call)
        nkb = -(-call.len_kv // bk)
        top_k = clamp_budget(self.info.name, "top_k", self.config.top_k, nkb)
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        if self.config.query_samples:  # r sampled queries against every token of a representative block
            rows = sample_rows(call, bq, self.config.query_samples)
            qp = q[:, :, rows.flatten()].unflatten(2, rows.shape).to(work)  # (B, Hq, nQB, r, D)
            last = k[:, :, -1:].expand(-1, -1, nkb * bk - call.len_kv, -1)  # padding repeats a real key
            kp = repeat_kv(torch.cat([k, last], 2).to(work), call.groups).unflatten(2, (nkb, bk))  # (B, Hq, nKB, bk, D)
        else:  # the mean query against the mean key of a representative block
            qp = block_means(q, bq)[:, :, :, None]  # (B, Hq, nQB, 1, D)
            kp = repeat_kv(block_means(k, bk), call.groups)[:, :, :, None]  # (B, Hq, nKB, 1, D)
        flat_keys = kp.flatten(0, 2)
        rows = (torch.arange(kp.shape[0] * kp.shape[1], device=q.device) * nkb).view(kp.shape[0], kp.shape[1], 1, 1)
        chunk = max(1, min(_QUERY_CHUNK, _GATHERED // (kp.shape[0] * kp.shape[1] * 2 * top_k * kp.shape[3] * kp.shape[4])))
        diag = last_key_block(call, bq, bk)
        visible = (diag + 1).clamp(min=0)[:, None]  # key blocks [0, visible) per query block
        branch = torch.arange(top_k + 1, device=q.device)
        bounds = (branch * visible) // top_k  # (nQB, top_k + 1): top_k ranges covering everything
        chosen = torch.cat([
            self._search(qp[:, :, a : a + chunk], flat_keys, rows, bounds[a : a + chunk], top_k, nkb)
            for a in range(0, qp.shape[2], chunk)
        ], dim=2)
        forced = forced_blocks(call, bq, bk, self.config.local_blocks).expand(*chosen.shape[:2], -1, -1)
        return unique_blocks(torch.cat([chosen, forced], -1))

    @staticmethod
    def _search(qp, flat_keys, rows, bounds, top_k: int, nkb: int) -> torch.Tensor:
        """The tree search for query blocks ``qp`` (B, H, c, r, D) over their ``bounds`` (c, top_k + 1),
        representatives ``flat_keys`` (B * H * nKB, t, D) per key block, a branch scored by its largest
        query x representative logit: the chosen key block per branch (B, H, c, top_k), -1 where a
        branch is empty."""
        starts = bounds[:, :-1].expand(*qp.shape[:2], -1, -1)
        ends = bounds[:, 1:].expand(*qp.shape[:2], -1, -1)
        while bool((ends - starts > 1).any()):
            mid = (starts + ends + 1) // 2
            starts, ends = torch.cat([starts, mid], -1), torch.cat([mid, ends], -1)
            rep = ((starts + ends - 1) // 2).clamp(min=0, max=nkb - 1) + rows  # representative block, flat id
            keys = flat_keys.index_select(0, rep.flatten()).view(*rep.shape, -1, flat_keys.shape[-1])  # (B, H, c, n, t, D)
            scores = (keys.flatten(3, 4) @ qp.transpose(-1, -2)).unflatten(3, keys.shape[3:5]).amax((-1, -2))
            scores = scores.masked_fill(ends <= starts, float("-inf"))
            best = scores.topk(top_k, dim=-1).indices
            starts, ends = torch.gather(starts, -1, best), torch.gather(ends, -1, best)
        return torch.where(ends - starts == 1, starts, -1)
