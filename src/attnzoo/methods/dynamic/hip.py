"""HiP attention: hierarchically pruned top-k key blocks found by a tree search."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnzoo.methods.dynamic.base import BlockSelectionMethod, TopKConfig, clamp_budget
from attnzoo.methods.dynamic.budget import Budget, LengthBudget

from ...errors import InvalidArgumentError, check_int
from ...kernels.dense import work_dtype
from ...method import Call, MethodInfo
from ...registry import register
from . import naive
from .scoring import (
    block_means,
    forced_blocks,
    last_key_block,
    listed_block_mass,
    sample_rows,
    unique_blocks,
)

BRANCH_SCORES = ("paper", "pooled", "bound")
_QUERY_CHUNK = 256  # query blocks searched at once: the gathered representatives stay in cache
_GATHERED = 1 << 22  # at most this many representative key elements gathered at once (16 MB)


@register
class HiP(LengthBudget, BlockSelectionMethod):
    """HiP attention ("HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention
    Pruning", arXiv 2406.09827): each query block (``block_size`` queries) finds its ``top_k`` key
    blocks by a tree search. The visible key blocks are split into ``top_k`` ranges (every block is
    in one, so none is unreachable); each step halves every range, scores each half by one
    representative key block, its centre (start + length // 2, HiP's ``sample_method="center"``:
    attention locality), and keeps the ``top_k`` best halves, until every range is one block.
    The first block (attention sinks) and, when causal, the diagonal block and the ``local_blocks``
    before it are always visited, besides the ``top_k`` found.
    ``branch_score`` says how a half is scored against its representative block:
    ``"paper"`` is HiP's (the masking iteration of DeepAuto-AI/hip-attention): the largest logit
    between the query block's queries (all of them, or ``query_samples`` r > 0 evenly spaced ones,
    as the official ``block_stride_q`` strides them) and the key tokens of the representative
    block, causal pairs only. ``"pooled"`` (not in the paper) is the mean query against the mean
    key of the representative block, one dot product per branch. The default (None) is
    ``"paper"`` with ``query_samples`` > 0 and ``"bound"`` (below) without.
    ``key_block_size`` (default ``block_size``) sets the key granularity on its own: HiP's
    reference code sizes query and key blocks separately, with key blocks of a few tokens and many
    branches, which gives a lone key a better chance to survive the first levels of the search
    (``local_blocks`` then counts key blocks).
    ``branch_score="bound"`` (not in the paper) scores a branch by Quest's upper bound of q . k over
    all its keys instead of one representative (see :class:`_BoundScore`; the mean query, or the
    largest over ``query_samples`` queries): a lone strong key among look-alike keys (a passkey in
    repeated filler) lifts the bound of every range that holds it, where a representative sees
    only filler.
    ``candidates`` c > 1 (not in the paper) lets the search keep c ``top_k`` blocks as a shortlist;
    the ``top_k`` of them on which ``rerank_samples`` evenly spaced queries of the query block put
    the most attention mass are kept (the softmax over the shortlisted and always-visited keys,
    :func:`~attnzoo.methods.dynamic.scoring.listed_block_mass`), so exact logits, not one representative, make the
    final choice; a shortlisted block that is visited anyway is dropped first. On SmolLM2-135M at
    4K tokens and about 15% density, c = 8 takes the perplexity increase from +9.9% to +1.6%
    (``benchmarks/dynamic_quality.py``).
    q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv). Selection O((N / b) r c k log(N / b) D) with r the
    queries scoring a branch (1 pooled), i.e. O(N log N) (the bound's sparse table adds
    O(N log(N) D / b); the re-ranking O(N c k rerank_samples D)); attention O(N k b D). ``top_k``
    above the number of key blocks is clamped (warning)."""

    info = MethodInfo(
        name="hip", title="HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning",
        arxiv="2406.09827", family=("dynamic",), causal=True, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(N k log(N) D / b + N k b D)", memory="O(N k D / b + N k b) per head",
        summary="hierarchical top-k pruning: a tree search over key blocks, O(N log N) selection",
    )

    @dataclass
    class Config(TopKConfig):
        top_k: int | None = None  # None: the budget rule (methods/dynamic/budget.py) at each call's length
        block_size: int | None = None
        query_samples: int = 0
        key_block_size: int | None = None
        branch_score: str | None = None
        candidates: int = 8
        rerank_samples: int = 4

        def __post_init__(self):
            super().__post_init__()
            self.query_samples = check_int("query_samples", self.query_samples, minimum=0)
            self.candidates = check_int("candidates", self.candidates)
            self.rerank_samples = check_int("rerank_samples", self.rerank_samples)
            if self.branch_score is None:
                self.branch_score = "paper" if self.query_samples else "bound"
            if self.branch_score not in BRANCH_SCORES:
                raise InvalidArgumentError("branch_score", f"None or one of {BRANCH_SCORES}", repr(self.branch_score))
            if self.branch_score == "pooled" and self.query_samples:
                raise InvalidArgumentError("query_samples", "0 with branch_score='pooled' (the mean query)", self.query_samples)
            if self.key_block_size is not None:
                self.key_block_size = check_int("key_block_size", self.key_block_size, minimum=2)

    # default blocks: the power of two at most N / 256 (16 below 8K keys): on SmolLM2 at 7K the
    # nearest one's 32-token blocks lose passkeys far from the question (README "Defaults")
    round_block_down = True

    def budget_config(self, budget: Budget, call: Call) -> dict:
        """The rule's blocks less the always-visited ones (block 0; causal: the diagonal and
        ``local_blocks``), which ``top_k`` does not count."""
        forced = 1 + (1 + self.config.local_blocks if call.causal else 0)
        return {"top_k": max(1, budget.key_blocks - forced), "block_size": budget.block_size}

    def kv_block(self, call: Call) -> int:
        return self.config.key_block_size or self.config.block_size

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        cfg = self.at_budget(call).config
        support = naive.hip_support(q, k, top_k=cfg.top_k, block_size=cfg.block_size, local_blocks=cfg.local_blocks,
                                    causal=call.causal, branch_score=cfg.branch_score, key_block_size=cfg.key_block_size,
                                    query_samples=cfg.query_samples, candidates=cfg.candidates,
                                    rerank_samples=cfg.rerank_samples, scale=call.scale)
        return naive.support_reference(q, k, v, support, call.scale)

    def _select(self, q, k, call: Call) -> torch.Tensor:
        bq, bk = self.config.block_size, self.kv_block(call)
        nkb = -(-call.len_kv // bk)
        top_k = clamp_budget(self.info.name, "top_k", self.config.top_k, nkb)
        width = min(top_k * self.config.candidates, nkb)  # blocks the search keeps
        work = work_dtype(q)
        B, Hq, G, cfg = call.batch, call.heads_q, call.groups, self.config
        reach = None  # (nQB, r): the last key each scoring query sees, for the paper's causal pairs
        if cfg.branch_score == "paper" or cfg.query_samples:  # r sampled queries, or all of them
            rows = sample_rows(call, bq, cfg.query_samples or bq)
            qp = q[:, :, rows.flatten()].unflatten(2, rows.shape).to(work)  # (B, Hq, nQB, r, D)
            if call.causal and cfg.branch_score == "paper":
                reach = rows + (call.len_kv - call.len_q)
        else:  # the mean query
            qp = block_means(q, bq)[:, :, :, None]  # (B, Hq, nQB, 1, D)
        if cfg.branch_score == "pooled":
            kp = block_means(k, bk)[:, :, :, None]  # (B, Hkv, nKB, 1, D): the mean key
        else:
            last = k[:, :, -1:].expand(-1, -1, nkb * bk - call.len_kv, -1)  # padding repeats a real key
            kp = torch.cat([k, last], 2).to(work).unflatten(2, (nkb, bk))  # (B, Hkv, nKB, bk, D)
        # first key block of each query head's key head, in (B * Hkv * nKB) rows
        first = ((torch.arange(B, device=q.device)[:, None] * call.heads_kv + torch.arange(Hq, device=q.device) // G) * nkb)[:, :, None, None]
        if cfg.branch_score == "bound":
            score = _BoundScore(kp, first, nkb)
            gathered = 2 * kp.shape[-1]
        else:
            score = _RepresentativeScore(kp.flatten(0, 2), first, nkb)
            gathered = kp.shape[3] * max(kp.shape[4], qp.shape[3])
        chunk = max(1, min(_QUERY_CHUNK, _GATHERED // (B * Hq * 2 * width * gathered)))
        diag = last_key_block(call, bq, bk)
        visible = (diag + 1).clamp(min=0)[:, None]  # key blocks [0, visible) per query block
        branch = torch.arange(width + 1, device=q.device)
        bounds = (branch * visible) // width  # (nQB, width + 1): ranges covering everything
        chosen = torch.cat([
            _search(qp[:, :, a : a + chunk], None if reach is None else reach[a : a + chunk], score, bounds[a : a + chunk], width)
            for a in range(0, qp.shape[2], chunk)
        ], dim=2)
        forced = unique_blocks(forced_blocks(call, bq, bk, self.config.local_blocks)).expand(*chosen.shape[:2], -1, -1)
        if width > top_k:
            chosen = self._rerank(q, k, call, chosen, forced, top_k)
        return unique_blocks(torch.cat([chosen, forced], -1))

    def _rerank(self, q, k, call: Call, chosen, forced, top_k: int) -> torch.Tensor:
        """The ``top_k`` of the search's ``chosen`` blocks (B, Hq, nQB, width) that take the most
        attention mass of ``rerank_samples`` queries per query block, the softmax running over the
        chosen and ``forced`` blocks' keys; a chosen block that is also forced is dropped first."""
        chosen = torch.where((chosen[..., None] == forced[..., None, :]).any(-1), -1, chosen)
        listed = torch.cat([chosen, forced], -1)
        mass = listed_block_mass(q, k, call, listed, self.config.block_size, self.kv_block(call), self.config.rerank_samples)
        best = mass[..., : chosen.shape[-1]].masked_fill(chosen < 0, -1.0).topk(top_k, dim=-1).indices
        return chosen.gather(-1, best)


def _search(qp, reach, score, bounds, top_k: int) -> torch.Tensor:
    """The tree search for query blocks ``qp`` (B, H, c, r, D) over their ``bounds`` (c, top_k + 1):
    halve every range, keep the ``top_k`` best halves by ``score(qp, reach, starts, ends)``, until
    every range is one key block (``reach`` (c, r) or None: the last key each query may see). The
    chosen key block per branch (B, H, c, top_k), -1 where a branch is empty."""
    starts = bounds[:, :-1].expand(*qp.shape[:2], -1, -1)
    ends = bounds[:, 1:].expand(*qp.shape[:2], -1, -1)
    while bool((ends - starts > 1).any()):
        mid = (starts + ends + 1) // 2
        starts, ends = torch.cat([starts, mid], -1), torch.cat([mid, ends], -1)
        scores = score(qp, reach, starts, ends).masked_fill(ends <= starts, float("-inf"))
        best = scores.topk(top_k, dim=-1).indices
        starts, ends = torch.gather(starts, -1, best), torch.gather(ends, -1, best)
    return torch.where(ends - starts == 1, starts, -1)


def representative_block(starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The key block that stands for the range [starts, ends): its centre, start + length // 2."""
    return starts + (ends - starts) // 2


class _RepresentativeScore:
    """A branch's score from its representative block: the largest logit between the queries and
    the key tokens ``flat_keys`` (B * Hkv * nKB, t, D) of the block (t = 1: the mean key), pairs
    past a query's ``reach`` excluded."""

    def __init__(self, flat_keys, first, nkb: int):
        self.flat_keys, self.first, self.nkb = flat_keys, first, nkb

    def __call__(self, qp, reach, starts, ends):
        block = representative_block(starts, ends).clamp(min=0, max=self.nkb - 1)
        t = self.flat_keys.shape[1]
        keys = self.flat_keys.index_select(0, (block + self.first).flatten()).view(*block.shape, t, -1)  # (B, H, c, n, t, D)
        logits = (keys.flatten(3, 4) @ qp.transpose(-1, -2)).unflatten(3, keys.shape[3:5])  # (B, H, c, n, t, r)
        if reach is not None:
            pos = block[..., None] * t + torch.arange(t, device=block.device)  # (B, H, c, n, t)
            logits = logits.masked_fill(pos[..., None] > reach[:, None, None, :], float("-inf"))
        return logits.amax((-1, -2))


class _BoundScore:
    """Quest's upper bound of q . k over every key of the branch ("Quest: Query-Aware Sparsity for
    Efficient Long-Context LLM Inference", arXiv 2406.10774): sum over d of max(q_d hi_d, q_d lo_d)
    with hi/lo the elementwise extremes of the keys, the largest over the queries. Extremes of any
    range of key blocks come from a sparse table (two overlapping power-of-two windows), so a
    branch costs O(D) whatever its length."""

    def __init__(self, kp, first, nkb: int):
        hi, lo = kp.amax(3).flatten(0, 2), kp.amin(3).flatten(0, 2)  # (B * Hkv * nKB, D)
        his, los = [hi], [lo]
        row = torch.arange(hi.shape[0], device=hi.device)
        block = row % nkb
        span = 1
        while 2 * span <= nkb:
            at = row + (block + span).clamp(max=nkb - 1) - block  # the block span later, within the head
            his.append(torch.maximum(his[-1], his[-1][at]))
            los.append(torch.minimum(los[-1], los[-1][at]))
            span *= 2
        self.hi, self.lo = torch.cat(his), torch.cat(los)  # level j holds the extremes of 2^j blocks from each block
        self.rows, self.first = hi.shape[0], first

    def __call__(self, qp, reach, starts, ends):
        length = (ends - starts).clamp(min=1)
        level = torch.log2(length.double()).floor().long()
        at_a = level * self.rows + self.first + starts.clamp(min=0)
        at_b = level * self.rows + self.first + (ends - (1 << level)).clamp(min=0)
        hi = torch.maximum(self.hi[at_a], self.hi[at_b])  # (B, H, c, n, D)
        lo = torch.minimum(self.lo[at_a], self.lo[at_b])
        return (hi @ qp.clamp(min=0).transpose(-1, -2) + lo @ qp.clamp(max=0).transpose(-1, -2)).amax(-1)
