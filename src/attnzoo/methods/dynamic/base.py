"""Shared machinery of the dynamic (content-selected, block-granular) methods.

A :class:`BlockSelectionMethod` chooses, from q and k, which key blocks each query block attends to
(``_select`` returns per (batch, query head, query block) key block ids with -1 holes), and the
block executor then computes exact softmax attention on exactly those blocks. The methods of this
package override ``_reference`` with the paper's selection written literally (:mod:`.naive`); the
default here, dense attention under the fast path's own selection (:meth:`DynamicMethod.selection`
exposes it), checks only the executor (``seer``, whose selection is a learned gate, keeps it).

Budgets are counts of key blocks. A budget larger than the number of key blocks is clamped to all of
them (which is dense attention) with a :class:`UserWarning`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ...errors import InvalidArgumentError, check_int
from ...kernels.block_sparse import (
    BACKENDS,
    BlockLayout,
    CausalMask,
    block_sparse_attention,
    choose_backend,
)
from ...kernels.block_sparse.builders import compact
from ...kernels.dense import masked_attention, repeat_kv
from ...method import Call, Method, Stopwatch
from .budget import check_budget


def clamp_budget(method: str, argument: str, value: int, available: int, unit: str = "key blocks") -> int:
    """``value`` key blocks (or other ``unit``), at most ``available``; warns when it had to clamp."""
    if value > available:
        warnings.warn(
            f"{method}: {argument}={value} exceeds the {available} {unit} of this input; using all of them",
            UserWarning, stacklevel=4,
        )
        return available
    return value


@dataclass
class TopKConfig:
    """``top_k`` key blocks per query block, blocks of ``block_size`` tokens (queries and keys);
    ``local_blocks``: when causal, the key blocks just before the diagonal block that are always
    visited (every query keeps at least its ``local_blocks * block_size`` nearest predecessors).
    ``top_k`` / ``block_size`` None: set per call by the budget rule (:mod:`.budget`)."""

    top_k: int = 8
    block_size: int = 64
    local_blocks: int = 1

    def __post_init__(self):
        self.top_k = check_budget("top_k", self.top_k)
        self.block_size = check_budget("block_size", self.block_size, minimum=2)
        self.local_blocks = check_int("local_blocks", self.local_blocks, minimum=0)


@dataclass
class RegionConfig:
    """Regions of a token grid: ``grid`` (H, W) row-major, or None for a 1-D sequence; ``n_win``
    regions per axis (n_win x n_win windows in 2-D, n_win chunks in 1-D), dividing every side."""

    n_win: int = 7
    grid: tuple[int, ...] | None = None

    def __post_init__(self):
        self.n_win = check_int("n_win", self.n_win)
        if self.grid is not None:
            if isinstance(self.grid, int):
                self.grid = (self.grid,)
            if not isinstance(self.grid, (tuple, list)) or len(self.grid) not in (1, 2):
                raise InvalidArgumentError("grid", "None, (N,) or (H, W)", repr(self.grid))
            self.grid = tuple(check_int(f"grid[{i}]", g) for i, g in enumerate(self.grid))

    def sides(self, tokens: int) -> tuple[int, ...]:
        """The grid of a call with ``tokens`` tokens, checked against the regions."""
        grid = self.grid or (tokens,)
        if torch.Size(grid).numel() != tokens:
            raise InvalidArgumentError("grid", f"a product equal to the {tokens} tokens", grid)
        for axis, n in enumerate(grid):
            if n % self.n_win:
                raise InvalidArgumentError("n_win", f"a divisor of every grid side (grid {grid}, axis {axis} has {n})", self.n_win)
        return grid


@dataclass
class Selection:
    """What a dynamic method chose for one call, for the block executor: ``layout``, optionally in a
    permuted token order (``q_order`` / ``kv_order``: (Nq,) / (Nk,) shared by all heads, or
    (B, Hq, N) per query head; the executor runs on the permuted tokens and the output is put back
    in the original order). ``repeats``: the orders are lists (B, Hq, M) in which a token may
    appear several times or not at all (balanced clusters); a query's results over its copies
    merge by log-sum-exp into one softmax over the union of their keys, zeros for one never
    listed."""

    layout: BlockLayout
    q_order: torch.Tensor | None = None
    kv_order: torch.Tensor | None = None
    repeats: bool = False


def _take(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D) with its tokens in ``order`` ((N,) or (B, H, N))."""
    if order.dim() == 1:
        return x.index_select(2, order)
    return torch.gather(x, 2, order[..., None].expand(-1, -1, -1, x.shape[-1]))


def _merge_copies(out: torch.Tensor, lse: torch.Tensor, order: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Results (B, H, M, Dv) and lse (B, H, M) of listed query copies, ``order`` (B, H, M) their
    tokens -> (B, H, n, Dv), (B, H, n): each token's copies merged by log-sum-exp (zeros, -inf
    for a token with no copy or no key)."""
    top = lse.new_full((*lse.shape[:2], n), float("-inf")).scatter_reduce(2, order, lse, "amax")
    weight = torch.exp(lse - top.gather(2, order)).nan_to_num(0.0)  # -inf - -inf: a copy without keys
    total = torch.zeros_like(top).scatter_add(2, order, weight)
    merged = torch.zeros(*out.shape[:2], n, out.shape[-1], dtype=lse.dtype, device=out.device)
    merged = merged.scatter_add(2, order[..., None].expand_as(out), out.to(lse.dtype) * weight[..., None])
    return (merged / total.clamp(min=torch.finfo(total.dtype).tiny)[..., None]).to(out.dtype), top + total.log()


def _put_back(out: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_take` along the tokens."""
    if order.dim() == 1:
        return torch.empty_like(out).index_copy_(2, order, out)
    return torch.empty_like(out).scatter_(2, order[..., None].expand_as(out), out)


class DynamicMethod(Method):
    """A content-selected method: ``plan`` chooses from q and k (timed as selection), ``execute``
    computes exact attention where the plan says (by default a :class:`Selection` on the shared
    block executor). The one ``_forward`` of the family; statistics come from the executor's counts
    through :meth:`~attnzoo.method.Method.call_stats`."""

    backends = BACKENDS

    def plan(self, q, k, call: Call):  # pragma: no cover - abstract
        raise NotImplementedError

    def execute(self, q, k, v, call: Call, plan) -> tuple[torch.Tensor, dict]:
        """Run a :class:`Selection` on the block executor; returns the output and the counts."""
        out, _, counts = self._run(q, k, v, call, plan, return_lse=False)
        return out, counts

    def _forward_with_lse(self, q, k, v, call: Call):
        plan = self.plan(q, k, call)
        if not isinstance(plan, Selection):
            return super()._forward_with_lse(q, k, v, call)
        out, lse, _ = self._run(q, k, v, call, plan, return_lse=True)
        return out, lse

    def _run(self, q, k, v, call: Call, plan: Selection, return_lse: bool):
        """(out, lse or None, counts) of a :class:`Selection` on the block executor, in the original order."""
        backend = choose_backend(self.backend, call.device)
        if plan.q_order is not None:
            per_head = plan.q_order.dim() > 1
            k, v = (repeat_kv(k, call.groups), repeat_kv(v, call.groups)) if per_head else (k, v)
            q, k, v = _take(q, plan.q_order), _take(k, plan.kv_order), _take(v, plan.kv_order)
        return_lse = return_lse or plan.repeats
        result = block_sparse_attention(q, k, v, plan.layout, scale=call.scale, backend=backend, static=False, return_lse=return_lse)
        out, lse, counts = result if return_lse else (result[0], None, result[1])
        if plan.repeats:
            out, lse = _merge_copies(out, lse, plan.q_order, call.len_q)
        elif plan.q_order is not None:
            out = _put_back(out, plan.q_order)
            lse = None if lse is None else _put_back(lse[..., None], plan.q_order)[..., 0]
        if counts["allowed"] is None:  # executors that do not count: the support's size
            counts["allowed"] = int(self._support_of(plan, call).expand(call.batch, call.heads_q, -1, -1).sum())
        counts["blocks_per_query_block"] = float(plan.layout.kv_counts.float().mean())
        return out, lse, counts

    def selection(self, q, k, v, *, causal: bool = False, scale: float | None = None):
        """What this call would attend to: the :class:`BlockLayout` of a :class:`Selection` (key
        blocks per batch, query head and query block, in the selection's token order), or the
        method's own plan."""
        plan = self.plan(q, k, self._prepare(q, k, v, causal, scale))
        return plan.layout if isinstance(plan, Selection) else plan

    def _forward(self, q, k, v, call: Call):
        watch = Stopwatch(call)
        plan = self.plan(q, k, call)
        selection_ms = watch.lap()
        out, counts = self.execute(q, k, v, call, plan)
        return out, self.call_stats(call, counts, selection_ms=selection_ms)

    def _support_of(self, plan: Selection, call: Call) -> torch.Tensor:
        """The (B|1, Hq|1, Nq, Nk) boolean support of a :class:`Selection`, in the original order."""
        mask = plan.layout.dense_mask(call.len_q, call.len_kv)
        if plan.q_order is None:
            return mask
        if plan.repeats:  # listed copies: a pair is in when some copy of the query sees some copy of the key
            q_of = torch.nn.functional.one_hot(plan.q_order, call.len_q).to(torch.float32)  # (B, Hq, M, Nq)
            k_of = torch.nn.functional.one_hot(plan.kv_order, call.len_kv).to(torch.float32)
            return (q_of.transpose(-1, -2) @ mask.to(torch.float32) @ k_of) > 0
        if plan.q_order.dim() == 1:
            out = torch.empty_like(mask)
            out[:, :, plan.q_order[:, None], plan.kv_order[None, :]] = mask
            return out
        mask = mask.expand(call.batch, call.heads_q, -1, -1)
        rows = torch.empty_like(mask).scatter_(2, plan.q_order[..., None].expand_as(mask), mask)
        return torch.empty_like(rows).scatter_(3, plan.kv_order[:, :, None, :].expand_as(rows), rows)

    def _support(self, q, k, v, call: Call) -> torch.Tensor:
        return self._support_of(self.plan(q, k, call), call)

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        return masked_attention(q, k, v, self._support(q, k, v, call), scale=call.scale)


class BlockSelectionMethod(DynamicMethod):
    """A dynamic method: ``_select`` picks key blocks per query block; the executor computes there.

    Subclasses set ``info`` and ``Config`` (with ``block_size``) and implement
    ``_select(q, k, call) -> (B, Hq, nQB, K)`` key block ids with -1 holes; selections should keep
    each query block's diagonal block when causal, so every query sees at least one key. A method
    that also picks single key columns for every query block overrides ``_select_with_columns``
    instead, returning the blocks and (B, Hq, C) column ids with -1 holes.
    """

    def q_block(self, call: Call) -> int:
        return self.config.block_size

    def kv_block(self, call: Call) -> int:
        return self.config.block_size

    def _select(self, q, k, call: Call) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _select_with_columns(self, q, k, call: Call) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._select(q, k, call), None

    def _layout(self, q, k, call: Call) -> BlockLayout:
        keys, columns = self._select_with_columns(q, k, call)
        mask_mod = CausalMask(call.len_kv - call.len_q) if call.causal else None
        return compact(keys, call.len_q, call.len_kv, self.q_block(call), kv_block=self.kv_block(call), mask_mod=mask_mod,
                       columns=columns)

    def plan(self, q, k, call: Call) -> Selection:
        return Selection(self._layout(q, k, call))

