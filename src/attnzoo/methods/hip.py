"""HiP attention: hierarchically pruned top-k key blocks found by a tree search."""

from __future__ import annotations

import torch

from ..kernels.dense import repeat_kv
from ..method import Call, MethodInfo
from ..registry import register
from ..selection import BlockSelectionMethod, TopKConfig, block_means, clamp_budget, forced_blocks, last_key_block, unique_blocks


_QUERY_CHUNK = 256  # query blocks searched at once: the gathered representatives stay in cache


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
    q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv). Selection O((N / b) k log(N / b) D), i.e.
    O(N log N); attention O(N k b D). ``top_k`` above the number of key blocks is clamped
    (warning)."""

    info = MethodInfo(
        name="hip", title="HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning",
        arxiv="2406.09827", family=("dynamic",), causal=True, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(N k log(N) D / b + N k b D)", memory="O(N k D / b + N k b) per head",
        summary="hierarchical top-k pruning: a tree search over key blocks, O(N log N) selection",
    )

    Config = TopKConfig

    def _select(self, q, k, call: Call) -> torch.Tensor:
        b = self.config.block_size
        nkb = -(-call.len_kv // b)
        top_k = clamp_budget(self.info.name, "top_k", self.config.top_k, nkb)
        qp = block_means(q, b)  # (B, Hq, nQB, D)
        kp = repeat_kv(block_means(k, b), call.groups)  # (B, Hq, nKB, D)
        flat_keys = kp.flatten(0, 2)
        rows = (torch.arange(kp.shape[0] * kp.shape[1], device=q.device) * nkb).view(kp.shape[0], kp.shape[1], 1, 1)
        diag = last_key_block(call, b, b)
        visible = (diag + 1).clamp(min=0)[:, None]  # key blocks [0, visible) per query block
        branch = torch.arange(top_k + 1, device=q.device)
        bounds = (branch * visible) // top_k  # (nQB, top_k + 1): top_k ranges covering everything
        chosen = torch.cat([
            self._search(qp[:, :, a : a + _QUERY_CHUNK], flat_keys, rows, bounds[a : a + _QUERY_CHUNK], top_k, nkb)
            for a in range(0, qp.shape[2], _QUERY_CHUNK)
        ], dim=2)
        forced = forced_blocks(call, b, self.config.local_blocks).expand(*chosen.shape[:2], -1, -1)
        return unique_blocks(torch.cat([chosen, forced], -1))

    @staticmethod
    def _search(qp, flat_keys, rows, bounds, top_k: int, nkb: int) -> torch.Tensor:
        """The tree search for query blocks ``qp`` (B, H, c, D) over their ``bounds`` (c, top_k + 1):
        the chosen key block per branch (B, H, c, top_k), -1 where a branch is empty."""
        starts = bounds[:, :-1].expand(*qp.shape[:2], -1, -1)
        ends = bounds[:, 1:].expand(*qp.shape[:2], -1, -1)
        while bool((ends - starts > 1).any()):
            mid = (starts + ends + 1) // 2
            starts, ends = torch.cat([starts, mid], -1), torch.cat([mid, ends], -1)
            rep = ((starts + ends - 1) // 2).clamp(min=0, max=nkb - 1) + rows  # representative block, flat id
            keys = flat_keys.index_select(0, rep.flatten()).view(*rep.shape, -1)
            scores = (keys @ qp[..., None]).squeeze(-1).masked_fill(ends <= starts, float("-inf"))
            best = scores.topk(top_k, dim=-1).indices
            starts, ends = torch.gather(starts, -1, best), torch.gather(ends, -1, best)
        return torch.where(ends - starts == 1, starts, -1)
