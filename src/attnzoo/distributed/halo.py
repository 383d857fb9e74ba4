"""Halo exchange for position patterns: each rank receives only the keys and values its queries'
windows reach on other ranks (a volume set by the window, not by N), then attends locally.

A 2-D / 3-D grid is sharded by rows (frames): shard lengths are whole rows of ``prod(grid[1:])``
tokens. For each pattern, :data:`ROW_REACH` gives the rows of keys a row of queries can see (a
bound; the pattern's own ``mask_mod`` then decides each pair), read from the method's config.

Patterns that look the same on a run of rows cut out of the sequence (:data:`TRANSLATES`: windows
and circles, undilated neighbourhoods) run the method itself, with its own executor, on the rank's
rows plus halos (the halo rows' queries zero and their outputs dropped); the others attend a
chunk of query rows at a time under the mask their ``mask_mod`` evaluates (O(chunk x reach)).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import InvalidArgumentError, UnsupportedError
from ..kernels.dense import attention_with_lse
from ..method import Call
from ..methods.local.neighborhood import axis_window
from .comm import Group, attach, exchange

QUERY_CHUNK = 2048  # query tokens attended at a time (O(chunk x reach) memory)


def _window(m, call):
    left, right = m._extents(call)
    return lambda i: (i - left, i + right + 1)


def _streaming(m, call):
    w = m.config.window
    return lambda i: (i - w + 1, i + 1)


def _neighborhood(m, call):
    grid, kernel, dilation, causal = m._axes(call)
    n, k, d, c = grid[0], kernel[0], dilation[0], causal[0]

    def span(i):
        group, first, count = axis_window(i, n, k, d, c)
        return first * d + group, (first + count - 1) * d + group + 1

    return span


def _clear(m, call):
    r = int(m.config.radius)
    return lambda i: (i - r, i + r + 1)


def _halo(m, call):
    _, block, halo = m._axes(call)
    b, h = block[0], halo[0]
    return lambda i: ((i // b) * b - h, (i // b + 1) * b + h)


def _maxvit_block(m, call):
    _, block = m._block(call)
    p = block[0]
    return lambda i: ((i // p) * p, (i // p + 1) * p)


# method name -> (method, full call) -> span(rows (R,) int64) -> (first row, end row) each query row may see
ROW_REACH = {
    "sliding_window": _window,
    "streaming": _streaming,
    "neighborhood": _neighborhood,
    "clear": _clear,
    "halo": _halo,
    "maxvit_block": _maxvit_block,
}


def _neighborhood_cut(m, call, rows):
    _, kernel, dilation, _ = m._axes(call)
    return math.prod(kernel) if dilation[0] == 1 and rows >= kernel[0] else None


# method name -> (method, call, rows in the cut) -> keys each query visits when the pattern is
# unchanged on that run of rows cut out of the sequence (the method itself then runs it), else None
TRANSLATES = {
    "sliding_window": lambda m, call, rows: sum(m._extents(call)) + 1,
    "neighborhood": _neighborhood_cut,
    "clear": lambda m, call, rows: (2 * int(m.config.radius) + 1) ** len(m.grid(call)),
}


def row_size(m, call: Call) -> int:
    """Tokens per sharding row: 1 for 1-D patterns, prod(grid[1:]) on a grid."""
    if not hasattr(m, "grid"):
        return 1
    if m.config.num_global:
        raise UnsupportedError(f"method {m.info.name!r} with num_global={m.config.num_global}: global tokens attend to "
                               "every rank's keys; the distributed halo form needs num_global=0")
    return math.prod(m.grid(call)[1:])


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [tuple(r) for r in merged]


def needed_tokens(m, call: Call, start: int, stop: int) -> list[tuple[int, int]]:
    """Token ranges [lo, hi) of keys the queries in tokens [start, stop) may see (merged, ascending)."""
    size = row_size(m, call)
    rows = torch.arange(start // size, -(-stop // size))
    lo, hi = ROW_REACH[m.info.name](m, call)(rows)
    total = call.len_kv // size
    ranges = [(max(0, int(lo.min())) * size, min(total, int(hi.max())) * size)]
    sinks = getattr(m.config, "sinks", 0) if m.info.name == "streaming" else 0
    if sinks:
        ranges.append((0, min(sinks, call.len_kv)))
    return _merge(ranges)


def check_shards(m, call: Call, lengths: list[int]) -> None:
    size = row_size(m, call)
    if any(n % size for n in lengths):
        raise InvalidArgumentError("shard lengths", f"multiples of the row of {size} tokens (grids are sharded by rows, "
                                   f"grid={m.grid(call)})", lengths)


def send_plan(m, call: Call, lengths: list[int]) -> list[list[tuple[int, int, int]]]:
    """Per rank, the (peer, first token, end token) ranges of its own keys it sends: the parts of
    each other rank's needed ranges that it holds. A pure function of the shapes (every rank
    computes all of it; the bench predicts volumes with it)."""
    check_shards(m, call, lengths)
    starts = [sum(lengths[:p]) for p in range(len(lengths) + 1)]
    plan: list[list[tuple[int, int, int]]] = [[] for _ in lengths]
    for p in range(len(lengths)):
        for lo, hi in needed_tokens(m, call, starts[p], starts[p + 1]):
            for owner in range(len(lengths)):
                a, b = max(lo, starts[owner]), min(hi, starts[owner + 1])
                if b > a and owner != p:
                    plan[owner].append((p, a, b))
    return plan


def halo_attention(q, k, v, m, call: Call, group: Group, lengths: list[int]) -> torch.Tensor:
    """This rank's output (B, Hq, n_r, Dv) of position pattern ``m`` (``call``: the whole sequence's)
    from its own keys plus the halos its neighbours send."""
    r = group.rank
    start = sum(lengths[:r])
    plan = send_plan(m, call, lengths)
    own = lambda t, a, b: t[:, :, a - start:b - start]  # noqa: E731
    sends = [(p, own(t, a, b)) for p, a, b in plan[r] for t in (k, v)]
    incoming = sorted((a, b, owner) for owner, ranges in enumerate(plan) for p, a, b in ranges if p == r)
    receives = [(owner, (*t.shape[:2], b - a, t.shape[3]), t.dtype, t.device) for a, b, owner in incoming for t in (k, v)]
    received = exchange(group, sends, receives, anchor=k)
    pieces = [(a, b, received[2 * i], received[2 * i + 1]) for i, (a, b, _) in enumerate(incoming)]
    pieces.append((start, start + lengths[r], k, v))
    pieces.sort(key=lambda piece: piece[0])
    keys, values = torch.cat([p[2] for p in pieces], 2), torch.cat([p[3] for p in pieces], 2)
    kv_pos = torch.cat([torch.arange(a, b, device=q.device) for a, b, _, _ in pieces])
    cut = run_of_rows(m, call, start, start + lengths[r])
    if cut is None:
        out = _local_attention(q, keys, values, kv_pos, m, call, start)
    else:
        out = _attend_cut(q, keys, values, m, call, start, *cut)
    return out if receives else attach(out, received)  # a send-only rank keeps its receipt


def run_of_rows(m, call: Call, start: int, stop: int) -> tuple[int, int] | None:
    """(lo, hi): the tokens whose keys queries [start, stop) see, when the method can run on them
    as a sequence of its own (:data:`TRANSLATES`); else None."""
    needed = needed_tokens(m, call, start, stop)
    translates = TRANSLATES.get(m.info.name)
    if len(needed) != 1 or translates is None:
        return None
    lo, hi = needed[0]
    return needed[0] if translates(m, call, (hi - lo) // row_size(m, call)) is not None else None


def _attend_cut(q, keys, values, m, call: Call, start: int, lo: int, hi: int) -> torch.Tensor:
    """The method itself on tokens [lo, hi) (a grid of those rows), queries outside this rank's zero
    (through ``attnzoo.attention``, whose cache keeps the configured method and its layouts)."""
    from ..api import attention

    config = dataclasses.asdict(m.config)
    if "grid" in config:
        config["grid"] = ((hi - lo) // row_size(m, call), *m.grid(call)[1:])
    pad = lambda n: q.new_zeros(*q.shape[:2], n, q.shape[3])  # noqa: E731
    q_cut = torch.cat([pad(start - lo), q, pad(hi - start - q.shape[2])], dim=2)
    out = attention(q_cut, keys, values, m.info.name, causal=call.causal, scale=call.scale, check_finite=False,
                    backend=m.backend, **config)
    return out[:, :, start - lo:start - lo + q.shape[2]]


def computed_pairs(m, call: Call, start: int, stop: int) -> int:
    """(query, key) pairs computed for queries [start, stop): the cut's queries times the keys each
    visits, or the chunks' dense boxes (the compute term of the bench's scaling model)."""
    cut = run_of_rows(m, call, start, stop)
    if cut is not None:
        return (cut[1] - cut[0]) * TRANSLATES[m.info.name](m, call, (cut[1] - cut[0]) // row_size(m, call))
    return sum((b - a) * sum(hi - lo for lo, hi in ranges) for a, b, ranges in query_chunks(m, call, start, stop))


def query_chunks(m, call: Call, start: int, stop: int):
    """(first, end) query tokens of each chunk of whole rows in [start, stop) with the key ranges
    its rows can reach: the unit :func:`halo_attention` computes densely."""
    size = row_size(m, call)
    chunk = max(1, QUERY_CHUNK // size) * size
    for a in range(start, stop, chunk):
        b = min(a + chunk, stop)
        yield a, b, needed_tokens(m, call, a, b)


def _local_attention(q, keys, values, kv_pos, m, call: Call, start: int) -> torch.Tensor:
    """Queries at tokens start.. over keys at ``kv_pos`` (ascending) under the pattern's mask, one
    :func:`query_chunks` chunk at a time."""
    mask_mod = m.mask_mod(call)
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    outs = []
    for a, b, ranges in query_chunks(m, call, start, start + q.shape[2]):
        index = torch.cat([torch.arange(int(torch.searchsorted(kv_pos, lo)), int(torch.searchsorted(kv_pos, hi)), device=q.device)
                           for lo, hi in ranges])
        q_pos = torch.arange(a, b, device=q.device)
        allowed = mask_mod(zero, zero, q_pos[:, None], kv_pos[index][None, :])
        out, _ = attention_with_lse(q[:, :, a - start:b - start], keys.index_select(2, index), values.index_select(2, index),
                                    scale=call.scale, mask=allowed)
        outs.append(out)
    return torch.cat(outs, dim=2)
