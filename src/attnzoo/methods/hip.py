"""HiP attention: hierarchically pruned top-k key blocks found by a tree search."""

from __future__ import annotations

import torch

from ..kernels.dense import repeat_kv
from ..method import Call, MethodInfo
from ..registry import register
from ..selection import BlockSelectionMethod, TopKConfig, block_means, clamp_budget, last_key_block, unique_blocks


@register
class HiP(BlockSelectionMethod):
    """HiP attention ("HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention
    Pruning", arXiv 2406.09827): each query block (``block_size`` queries, mean-pooled) finds its
    ``top_k`` key blocks by a tree search. The visible key blocks are split into ``top_k`` ranges
    (every block is in one, so none is unreachable); each step halves every range, scores each half
    by the pooled query against the pooled key of the half's middle block (attention locality: one
    representative per branch) and keeps the ``top_k`` best halves, until every range is one block.
    The first block (attention sinks) and, when causal, the diagonal block are always visited.
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
        diag = last_key_block(call, b, b)
        visible = (diag + 1).clamp(min=0)[:, None]  # key blocks [0, visible) per query block
        branch = torch.arange(top_k + 1, device=q.device)
        bounds = (branch * visible) // top_k  # (nQB, top_k + 1): top_k ranges covering everything
        starts = bounds[:, :-1].expand(*qp.shape[:2], -1, -1)
        ends = bounds[:, 1:].expand(*qp.shape[:2], -1, -1)
        while bool((ends - starts > 1).any()):
            mid = (starts + ends + 1) // 2
            starts, ends = torch.cat([starts, mid], -1), torch.cat([mid, ends], -1)
            rep = ((starts + ends - 1) // 2).clamp(min=0, max=nkb - 1)
            keys = torch.gather(kp, 2, rep.flatten(2)[..., None].expand(-1, -1, -1, kp.shape[-1]))
            scores = (keys.view(*rep.shape, -1) * qp[..., None, :]).sum(-1)
            scores = scores.masked_fill(ends <= starts, float("-inf"))
            best = scores.topk(top_k, dim=-1).indices
            starts, ends = torch.gather(starts, -1, best), torch.gather(ends, -1, best)
        chosen = torch.where(ends - starts == 1, starts, -1)
        forced = torch.stack([torch.zeros_like(diag), diag], -1).expand(*chosen.shape[:2], -1, -1)
        forced = torch.where(forced <= diag[:, None], forced, -1)
        return unique_blocks(torch.cat([chosen, forced], -1))
