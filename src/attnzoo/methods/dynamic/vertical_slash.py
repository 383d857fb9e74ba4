"""MInference vertical-slash: key columns and diagonals estimated from the last queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnzoo.methods.dynamic.base import BlockSelectionMethod, clamp_budget
from attnzoo.methods.dynamic.budget import Budget, LengthBudget, check_budget, estimate_queries_for

from ...errors import InvalidArgumentError, check_int
from ...kernels.block_sparse import membership
from ...kernels.dense import work_dtype
from ...method import Call, MethodInfo
from ...registry import register
from . import naive
from .scoring import last_key_block, top_blocks, unique_blocks


QUESTION_QUERIES = 64  # the late columns read the last 64 queries, MInference's own estimate (last_q=64)


@register
class VerticalSlash(LengthBudget, BlockSelectionMethod):
    """MInference's vertical-slash pattern ("MInference 1.0: Accelerating Pre-filling for
    Long-Context LLMs via Dynamic Sparse Attention", arXiv 2407.02490).

    The last ``last_q`` queries (``estimate_queries="spread"``: ``last_q`` queries spread evenly
    over the sequence, not in the paper) attend densely (causal); summing their attention per key
    column gives vertical scores, summing it along diagonals (offset = query position - key
    position) gives slash scores. Every query block then visits the ``vertical_blocks`` key blocks
    with the most vertical mass (block 0, the attention sinks, always) and, along the
    ``slash_blocks`` block diagonals with the most slash mass (its own diagonal block and the
    ``local_blocks`` before it always, as MInference always keeps the nearest diagonals), the key
    block at that distance; a token diagonal counts for both block diagonals it crosses.
    ``vertical_columns`` c > 0 adds the c single key columns with the most vertical mass outside
    those blocks, which every query block also visits: MInference's vertical lines are single
    tokens like these (its kernel gathers them), so ``vertical_blocks=1, vertical_columns=c`` is
    the paper's pattern, with the slashes kept at block granularity. With the spread estimate,
    ``last_columns`` of those c columns instead go to the keys the last 64 queries attend to most
    (MInference's own estimate: what the prompt's end, often a question, reads; not in the paper),
    outside the other columns and the last queries' own diagonal blocks. Causal only, like the paper.
    q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv). Selection O(last_q N D), attention
    O(N ((v + s) b + c) D). Budgets above the number of key blocks (of keys for c) are clamped
    (warning)."""

    info = MethodInfo(
        name="vertical_slash", title="MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention",
        arxiv="2407.02490", family=("dynamic",), causal=True, non_causal=False, cross=True, gqa=True, training_free=True,
        time="O(last_q N D + N ((v + s) b + c) D)", memory="O(last_q N + N ((v + s) b + c)) per head",
        summary="vertical lines + slash diagonals estimated from the last queries (MInference)",
    )

    @dataclass
    class Config:
        # None: the budget rule (methods/dynamic/budget.py) at each call's length
        vertical_blocks: int | None = None
        slash_blocks: int | None = None
        vertical_columns: int | None = None
        last_q: int | None = None
        block_size: int | None = None
        local_blocks: int = 1
        estimate_queries: str = "spread"
        last_columns: int | None = None

        def __post_init__(self):
            self.vertical_blocks = check_budget("vertical_blocks", self.vertical_blocks)
            self.slash_blocks = check_budget("slash_blocks", self.slash_blocks)
            self.vertical_columns = check_budget("vertical_columns", self.vertical_columns, minimum=0)
            self.last_q = check_budget("last_q", self.last_q)
            self.block_size = check_budget("block_size", self.block_size, minimum=2)
            self.local_blocks = check_int("local_blocks", self.local_blocks, minimum=0)
            self.last_columns = check_budget("last_columns", self.last_columns, minimum=0)
            if self.estimate_queries not in ("last", "spread"):
                raise InvalidArgumentError("estimate_queries", "'last' or 'spread'", repr(self.estimate_queries))

    def budget_config(self, budget: Budget, call: Call) -> dict:
        """The paper's shape for the rule's K blocks: the first block as the one vertical block,
        2K / 3 slash blocks and K / 2 blocks' worth of single vertical columns. The parts overlap
        (columns inside slash blocks; slashes past the diagonal for early queries), so this
        nominal 1.2 K blocks lands near the target (measured: README, ### Defaults).
        No columns when ``vertical_blocks`` or ``slash_blocks`` is given (the block pattern); the
        estimate from the rule's number of queries; with the spread estimate a quarter of the
        columns in effect read from the last queries (``last_columns``)."""
        slashes = max(self.config.local_blocks + 1, round(2 * budget.key_blocks / 3))
        columns = budget.key_blocks // 2 * budget.block_size
        if self.config.vertical_blocks is not None or self.config.slash_blocks is not None:
            columns = 0
        in_effect = columns if self.config.vertical_columns is None else self.config.vertical_columns
        return {"vertical_blocks": 1, "slash_blocks": slashes, "vertical_columns": columns, "block_size": budget.block_size,
                "last_q": estimate_queries_for(call.len_kv),
                "last_columns": in_effect // 4 if self.config.estimate_queries == "spread" else 0}

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        cfg = self.at_budget(call).config
        support = naive.vertical_slash_support(q, k, vertical_blocks=cfg.vertical_blocks, slash_blocks=cfg.slash_blocks,
                                               block_size=cfg.block_size, local_blocks=cfg.local_blocks, last_q=cfg.last_q,
                                               vertical_columns=cfg.vertical_columns or 0, causal=call.causal,
                                               scale=call.scale, estimate_queries=cfg.estimate_queries,
                                               last_columns=cfg.last_columns or 0)
        return naive.support_reference(q, k, v, support, call.scale)

    def query_positions(self, call: Call, n: int, last: bool) -> torch.Tensor:
        """(n,) the query positions an estimate reads: the last n, or n spread evenly over the sequence."""
        return (torch.arange(call.len_q - n, call.len_q, device=call.device) if last
                else torch.linspace(0, call.len_q - 1, n, device=call.device).round().long())

    def attention_of(self, q, k, call: Call, pos: torch.Tensor) -> torch.Tensor:
        """(B, Hq, n, Nk) exact causal attention of the queries at ``pos`` (bottom-right aligned; a
        query that sees no key: zeros)."""
        B, Hq, G, Nk, n = call.batch, call.heads_q, call.groups, call.len_kv, len(pos)
        reach = pos + (Nk - call.len_q)  # the last key each of these queries sees
        work = work_dtype(q)
        rows = (q[:, :, pos].to(work) * call.scale).reshape(B, Hq // G, G * n, -1)  # GQA as extra rows
        scores = (rows @ k.to(work).transpose(-1, -2)).view(B, Hq, n, Nk)
        first = max(0, int(reach.min()) + 1)  # columns before it are visible to every row
        hidden = torch.arange(first, Nk, device=q.device)[None, :] > reach[:, None]
        scores[..., first:].masked_fill_(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return probs.nan_to_num(0.0) if first == 0 else probs

    def estimate(self, q, k, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        """Vertical (B, Hq, Nk) and slash (B, Hq, Nk, by offset) attention mass of ``last_q`` queries:
        the last ones, or spread evenly over the sequence (``estimate_queries``)."""
        pos = self.query_positions(call, min(self.config.last_q, call.len_q), self.config.estimate_queries == "last")
        probs = self.attention_of(q, k, call, pos)
        B, Hq, Nk = call.batch, call.heads_q, call.len_kv
        # the key j of the query reaching p lies on diagonal p - j
        offsets = (pos[:, None] + (Nk - call.len_q) - torch.arange(Nk, device=q.device)[None, :]).clamp(min=0)
        slash = torch.zeros_like(probs[:, :, 0]).scatter_add_(-1, offsets.flatten().expand(B, Hq, -1), probs.flatten(2))
        return probs.sum(2), slash

    def _select_with_columns(self, q, k, call: Call) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg, b = self.config, self.config.block_size
        nkb = -(-call.len_kv // b)
        vertical, slash = self.estimate(q, k, call)
        pad = nkb * b - call.len_kv
        v_blocks = torch.nn.functional.pad(vertical, (0, pad)).unflatten(-1, (nkb, b)).sum(-1)
        s_blocks = torch.nn.functional.pad(slash, (0, pad)).unflatten(-1, (nkb, b)).sum(-1)
        s_blocks = s_blocks + torch.nn.functional.pad(s_blocks[..., :-1], (1, 0))  # offsets in [(d-1) b, (d+1) b)
        top = torch.finfo(v_blocks.dtype).max
        v_blocks[..., 0] = top
        s_blocks[..., : cfg.local_blocks + 1] = top
        verticals = top_blocks(v_blocks, clamp_budget(self.info.name, "vertical_blocks", cfg.vertical_blocks, nkb))
        slashes = top_blocks(s_blocks, clamp_budget(self.info.name, "slash_blocks", cfg.slash_blocks, nkb))
        diag = last_key_block(call, b, b)  # (nQB,)
        v = verticals[:, :, None, :].expand(-1, -1, diag.numel(), -1)
        v = torch.where((v >= 0) & (v <= diag[:, None]), v, -1)
        s = diag[:, None] - slashes[:, :, None, :]
        s = torch.where((slashes[:, :, None, :] >= 0) & (s >= 0), s, -1)
        columns = None
        if cfg.vertical_columns:
            # the heaviest single columns outside the vertical blocks already chosen
            outside = vertical.masked_fill(membership(verticals, nkb).repeat_interleave(b, -1)[..., : call.len_kv], float("-inf"))
            count = clamp_budget(self.info.name, "vertical_columns", cfg.vertical_columns, call.len_kv, "keys")
            late = min(cfg.last_columns or 0, count) if cfg.estimate_queries == "spread" else 0
            top = outside.topk(count - late, dim=-1)
            columns = torch.where(torch.isfinite(top.values), top.indices, -1)
            if late:
                columns = torch.cat([columns, self.late_columns(q, k, call, outside, columns, late)], dim=-1)
        return unique_blocks(torch.cat([v, s], dim=-1)), columns

    def late_columns(self, q, k, call: Call, outside: torch.Tensor, chosen: torch.Tensor, count: int) -> torch.Tensor:
        """(B, Hq, count) single key columns with the most attention mass of the last
        :data:`QUESTION_QUERIES` queries (what the end of the prompt, a question, reads), besides the
        columns ``chosen`` (-1 holes), the vertical blocks (-inf in ``outside``) and the keys the last
        queries' own diagonal blocks hold."""
        cfg = self.config
        late = self.attention_of(q, k, call, self.query_positions(call, min(QUESTION_QUERIES, call.len_q), last=True)).sum(2)
        late = late.masked_fill(membership(chosen, late.shape[-1]) | ~torch.isfinite(outside), float("-inf"))
        near = call.len_kv - min(QUESTION_QUERIES, call.len_q) - (cfg.local_blocks + 1) * cfg.block_size
        late[..., max(near, 0):] = float("-inf")
        top = late.topk(min(count, late.shape[-1]), dim=-1)
        return torch.where(torch.isfinite(top.values) & (top.values > 0), top.indices, -1)
