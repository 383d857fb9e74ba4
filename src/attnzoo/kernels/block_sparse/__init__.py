"""The shared block-sparse executor: one entry point, an explicit executor table behind it.

Executors (name, backend), each with a ``can_run(q, k, v, layout)`` predicate (O(1), on layout
attributes):

* ``strip`` (torch): 2-D boxes shared by every batch row and head, read through strided views of
  column-major strips (:mod:`.strip`);
* ``blocks`` (torch): block-granular layouts in natural order, single key ``columns`` included
  (:mod:`.blocks`);
* ``gather`` (torch): any layout without columns: 1-D bands as strided slices, attention sinks
  merged by log-sum-exp, other blocks gathered (:mod:`.gather`);
* ``flex`` (flex): compiled FlexAttention (eager off CUDA) with a BlockMask built from the block
  lists (:mod:`.flex`);
* ``naive`` (naive): dense reference with the materialised mask; tests only.

``backend="auto"`` tries, in order, ``flex, strip, blocks, gather`` on CUDA when FlexAttention is
available, ``strip, blocks, gather`` elsewhere; ``torch`` tries ``strip, blocks, gather``;
``gather`` is accepted as an alias of ``torch``. An explicit backend none of whose executors can
run the layout raises :class:`~attnzoo.errors.UnsupportedError` naming every executor's reason.
"""

from __future__ import annotations

import torch

from ...masks import CausalMask
from ..backends import Dispatcher, Executor
from . import blocks, flex, gather, naive, strip
from .layout import BlockLayout, MaskMod, membership, present_ids
from .strip import Boxes2D

__all__ = ["BACKENDS", "BLOCK_SPARSE", "BlockLayout", "Boxes2D", "CausalMask", "MaskMod", "block_sparse_attention",
           "block_sparse_executor", "choose_backend", "membership", "present_ids"]


def _counted(out, lse, layout: BlockLayout, heads: int):
    """Output, log-sum-exp and counts of an executor that does not count: the visited entries."""
    visited = float(layout.kv_counts.float().sum(-1).mean()) * layout.q_block * layout.kv_block * layout.num_q_blocks
    return out, lse, {"allowed": None, "computed": int(visited * heads)}


def _run_flex(q, k, v, layout, *, scale, static, return_lse):
    out, lse = flex.flex_block_sparse(q, k, v, layout, scale=scale, compile=q.device.type == "cuda", return_lse=return_lse)
    return _counted(out, lse, layout, q.shape[0] * q.shape[1])


def _run_naive(q, k, v, layout, *, scale, static, return_lse):
    out, lse = naive.naive_block_sparse(q, k, v, layout, scale=scale, return_lse=return_lse)
    return _counted(out, lse, layout, q.shape[0] * q.shape[1])


def _run_strip(q, k, v, layout, *, scale, static, return_lse):
    return strip.strip_attention(q, k, v, layout, scale=scale, return_lse=return_lse)


STRIP = Executor("strip", "torch", strip.can_run, _run_strip)
BLOCKS = Executor("blocks", "torch", blocks.can_run, blocks.block_attention)
GATHER = Executor("gather", "torch", gather.can_run, gather.gather_attention)
FLEX = Executor("flex", "flex", flex.can_run, _run_flex)
NAIVE = Executor("naive", "naive", naive.can_run, _run_naive)


def _auto_order(device: torch.device) -> tuple[Executor, ...]:
    if device.type == "cuda" and flex.available():
        return (FLEX, STRIP, BLOCKS, GATHER)
    return (STRIP, BLOCKS, GATHER)


BLOCK_SPARSE = Dispatcher("block-sparse", (STRIP, BLOCKS, GATHER, FLEX, NAIVE), _auto_order, aliases={"gather": "torch"})
BACKENDS = BLOCK_SPARSE.accepted  # ("auto", "torch", "flex", "naive", "gather")


def choose_backend(requested: str, device: torch.device) -> str:
    """The backend a call on ``device`` runs: ``auto`` -> ``flex`` on CUDA (when FlexAttention is
    available), ``torch`` elsewhere; ``gather`` -> ``torch``; an explicit choice is kept."""
    return BLOCK_SPARSE.resolve(requested, device)


def block_sparse_executor(q, k, v, layout: BlockLayout, backend: str = "auto") -> Executor:
    """The executor :func:`block_sparse_attention` runs for these arguments (``.name``, ``.backend``)."""
    return BLOCK_SPARSE.choose(backend, q, k, v, layout)


def block_sparse_attention(q, k, v, layout: BlockLayout, *, scale: float, backend: str = "auto", static: bool = True,
                           return_lse: bool = False):
    """Attention restricted to ``layout``: q (B,Hq,Nq,D), k (B,Hkv,Nk,D), v (B,Hkv,Nk,Dv) -> (B,Hq,Nq,Dv).

    ``static`` layouts (fixed by positions) cache their execution plan. Rows with no allowed key
    return zeros. Returns the output and the counts dict: ``allowed`` and ``computed`` (query, key)
    entries (``allowed`` None where the executor does not count), ``executor`` (the one that ran)
    and ``backend`` (its backend). With ``return_lse``, (out, lse, counts): lse (B,Hq,Nq) each row's
    natural log-sum-exp over its allowed keys, float32 (float64 stays), -inf for rows with no key.
    """
    executor = block_sparse_executor(q, k, v, layout, backend)
    out, lse, counts = executor.run(q, k, v, layout, scale=scale, static=static, return_lse=return_lse)
    counts = {**counts, "executor": executor.name, "backend": executor.backend}
    return (out, lse, counts) if return_lse else (out, counts)
