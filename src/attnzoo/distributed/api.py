"""``attnzoo.distributed.attention``: one call on each rank's shard of the sequence."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import InvalidArgumentError, UnsupportedError
from ..method import Call, Method, check_qkv
from ..registry import as_method
from .comm import Group, gather_ints, resolve_group
from .halo import ROW_REACH, halo_attention
from .layout import check_layout, positions
from .linear import STATE_METHODS, linear_state_attention
from .ring import ring_attention, ulysses_attention
from .selection import SELECTION_METHODS, selection_attention

STRATEGIES = ("auto", "ring", "ulysses", "halo", "state", "selection")
RING_METHODS = ("dense",)


def distributed_forms() -> dict[str, str]:
    """Method name -> the strategy ``strategy="auto"`` runs it with (every method also runs with
    ``strategy="ulysses"``, which gives each rank whole sequences of some heads)."""
    return {**{n: "ring" for n in RING_METHODS}, **{n: "halo" for n in ROW_REACH}, **{n: "state" for n in STATE_METHODS},
            **{n: "selection" for n in SELECTION_METHODS}}


def _strategy(m: Method, strategy: str, layout: str) -> str:
    name = m.info.name
    if strategy not in STRATEGIES:
        raise InvalidArgumentError("strategy", f"one of {STRATEGIES}", repr(strategy))
    forms = distributed_forms()
    if strategy == "auto":
        if name not in forms:
            raise UnsupportedError(f"method {name!r} has no distributed form over sequence shards; methods with one: "
                                   f"{', '.join(sorted(forms))} (or strategy='ulysses', which splits heads, for any method)")
        strategy = forms[name]
    if strategy != "ulysses" and forms.get(name) != strategy:
        raise InvalidArgumentError("strategy", f"'ulysses' or {forms[name]!r} for method {name!r}" if name in forms
                                   else f"'ulysses' for method {name!r}", repr(strategy))
    if layout == "zigzag" and strategy in ("halo", "state", "selection"):
        raise InvalidArgumentError("layout", f"'contiguous' for strategy {strategy!r} (its exchange "
                                   "plan is for a contiguous split)", repr(layout))
    return strategy


def _shard_lengths(group: Group, q, k, v) -> list[int]:
    """Every rank's shard length, after checking that the ranks' shapes agree (one all-gather)."""
    if q.shape[2] != k.shape[2]:
        raise InvalidArgumentError("k", f"this rank's {q.shape[2]} query tokens (context-parallel self-attention: q, k "
                                   "and v are shards of the same tokens)", f"{k.shape[2]} tokens")
    meta = [q.shape[2], q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3]]
    table = gather_ints(group, meta, q.device)
    names = ("batch", "query heads", "key/value heads", "head_dim", "value head_dim")
    for i, name in enumerate(names, start=1):
        column = table[:, i].tolist()
        if len(set(column)) != 1:
            raise InvalidArgumentError("q, k, v", f"the same {name} on every rank", f"{column} on ranks 0..{group.size - 1}")
    return table[:, 0].tolist()


def shard_positions(tokens: int, *, group=None, layout: str = "contiguous", device=None) -> torch.Tensor:
    """Sequence positions (int64) of this rank's ``tokens`` tokens, from every rank's count (one
    all-gather): what rotary embeddings of a sharded sequence use."""
    g = resolve_group(group)
    lengths = gather_ints(g, [tokens], device)[:, 0].tolist() if g.size > 1 else [tokens]
    return positions(lengths, g.rank, check_layout(layout), device)


def whole_call(m: Method, q, k, v, total: int, *, causal: bool, scale: float | None) -> Call:
    """The :class:`Call` of the whole (unsharded) sequence, checked by the method as a local call would be."""
    meta = lambda t: torch.empty(t.shape[0], t.shape[1], total, t.shape[3], dtype=t.dtype, device="meta")  # noqa: E731
    call = m._prepare(meta(q), meta(k), meta(v), causal, scale, check_finite=False)
    return dataclasses.replace(call, device=q.device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str | Method = "dense", *, group=None,
              causal: bool = False, scale: float | None = None, layout: str = "contiguous", strategy: str = "auto",
              **config: Any) -> torch.Tensor:
    """Context-parallel attention: q (B, Hq, n_r, D), k, v (B, Hkv, n_r, D | Dv) are this rank's shard
    of one sequence (``layout``: ``contiguous``, lengths may differ, or ``zigzag``, see
    :mod:`attnzoo.distributed.layout`) -> this rank's shard of the output (B, Hq, n_r, Dv), equal to
    the single-process result; differentiable. ``strategy``: ``auto`` (dense: ``ring``; position
    patterns: ``halo``; linear methods: ``state``; ``block_sparse``: ``selection``), or
    ``ulysses`` for any method. Every rank of
    ``group`` (None: the default group) must make the same call."""
    m = as_method(method, **config)
    layout = check_layout(layout)
    check_qkv(q, k, v, causal=causal, scale=scale, check_finite=False)
    g = resolve_group(group)
    chosen = _strategy(m, strategy, layout)
    if g.size == 1:
        return m(q, k, v, causal=causal, scale=scale, check_finite=False)
    lengths = _shard_lengths(g, q, k, v)
    call = whole_call(m, q, k, v, sum(lengths), causal=causal, scale=scale)
    if chosen == "ring":
        return ring_attention(q, k, v, g, lengths, layout=layout, causal=causal, scale=call.scale)
    if chosen == "ulysses":
        return ulysses_attention(q, k, v, m, g, lengths, layout=layout, causal=causal, scale=call.scale)
    if chosen == "halo":
        return halo_attention(q, k, v, m, call, g, lengths)
    if chosen == "selection":
        return selection_attention(q, k, v, m, call, g, lengths)
    return linear_state_attention(q, k, v, m, call, g, lengths)
