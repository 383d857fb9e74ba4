"""Block selection across ranks: a content-selected method whose choice needs only block means
(``block_sparse`` with ``estimator="pooled_qk"``) picks its key blocks from all-gathered key block
means, and each rank then fetches only the key/value blocks its queries selected, so a sparse
selection also saves communication (a ring would move every block).

The selection runs the method's own ``_select`` on stand-ins of the whole sequence: this rank's
queries (zeros elsewhere) and keys equal to their block means, whose block means are the real ones.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError, UnsupportedError
from ..kernels.dense import attention_with_lse
from ..method import Call
from .comm import Group, all_gather, attach, exchange

SELECTION_METHODS = ("block_sparse",)


def _check(m, lengths: list[int]) -> int:
    if m.config.estimator != "pooled_qk":
        raise UnsupportedError(f"method {m.info.name!r} with estimator={m.config.estimator!r} scores blocks with exact "
                               "attention over every key (the default); its distributed form needs estimator='pooled_qk'")
    b = m.config.block_size
    if b is None:
        raise InvalidArgumentError("block_size", "an explicit block size with the distributed form (the default follows the "
                                   "whole sequence's length, which a rank does not see, and every rank must cut the same blocks)", None)
    if any(n % b for n in lengths):
        raise InvalidArgumentError("shard lengths", f"multiples of block_size = {b} (selection is per block)", lengths)
    return b


def local_selection(q, k, m, call: Call, group: Group, lengths: list[int]) -> torch.Tensor:
    """(B, Hq, n_r / b, top_k) global key block ids (-1 holes) this rank's query blocks attend to."""
    b = _check(m, lengths)
    start = sum(lengths[: group.rank])
    with torch.no_grad():  # a top-k choice: no gradient, as in the single-process call
        means = k.unflatten(2, (-1, b)).mean(3)
        keys = torch.cat(all_gather(group, means, [n // b for n in lengths]), dim=2).repeat_interleave(b, dim=2)
        queries = q.new_zeros(q.shape[0], q.shape[1], call.len_q, q.shape[3])
        queries[:, :, start:start + q.shape[2]] = q
        chosen = m._select(queries, keys.to(k.dtype), call)
    return chosen[:, :, start // b:(start + q.shape[2]) // b]


def selection_attention(q, k, v, m, call: Call, group: Group, lengths: list[int]) -> torch.Tensor:
    """This rank's output (B, Hq, n_r, Dv): each query block over the key blocks it selected,
    fetched from their owners (only those blocks move)."""
    b = m.config.block_size
    W, r = group.size, group.rank
    chosen = local_selection(q, k, m, call, group, lengths)
    first_block = [sum(lengths[:p]) // b for p in range(W + 1)]
    n_blocks = first_block[-1]
    wanted = torch.zeros(n_blocks, dtype=torch.uint8, device=q.device)
    wanted[chosen[chosen >= 0].unique()] = 1
    every = all_gather(group, wanted)  # which blocks each rank needs
    own = range(first_block[r], first_block[r + 1])
    tokens = lambda ids: torch.cat([torch.arange(j * b, (j + 1) * b) for j in ids]).to(q.device) - first_block[r] * b  # noqa: E731
    sends, receives, fetched = [], [], []
    for p in range(W):
        if p == r:
            continue
        mine = [j for j in own if every[p][j]]
        if mine:
            sends += [(p, k.index_select(2, tokens(mine))), (p, v.index_select(2, tokens(mine)))]
        theirs = [j for j in range(first_block[p], first_block[p + 1]) if every[r][j]]
        if theirs:
            receives += [(p, (*k.shape[:2], len(theirs) * b, k.shape[3]), k.dtype, k.device),
                         (p, (*v.shape[:2], len(theirs) * b, v.shape[3]), v.dtype, v.device)]
            fetched.append(theirs)
    received = exchange(group, sends, receives, anchor=k)
    local = lambda t, j: t[:, :, (j - first_block[r]) * b:(j - first_block[r] + 1) * b]  # noqa: E731
    blocks = {j: (local(k, j), local(v, j)) for j in own}
    for i, ids in enumerate(fetched):
        for kb, vb, j in zip(received[2 * i].split(b, dim=2), received[2 * i + 1].split(b, dim=2), ids):
            blocks[j] = (kb, vb)
    out = torch.cat([_query_block(q, blocks, chosen, i, first_block[r] + i, b, call) for i in range(chosen.shape[2])], dim=2)
    return out if receives else attach(out, received)  # a send-only rank keeps its receipt


def _query_block(q, blocks, chosen, i: int, global_block: int, b: int, call: Call) -> torch.Tensor:
    """Local query block ``i`` over the union of the key blocks its (batch, head) rows selected,
    each row masked to its own selection (and causality)."""
    ids = chosen[:, :, i]  # (B, Hq, top_k)
    union = ids[ids >= 0].unique().tolist()
    keys = torch.cat([blocks[j][0] for j in union], dim=2)
    values = torch.cat([blocks[j][1] for j in union], dim=2)
    member = (ids[..., None] == torch.tensor(union, device=q.device)).any(-2)  # (B, Hq, |union|)
    mask = member.repeat_interleave(b, dim=-1)[:, :, None, :]
    if call.causal:
        q_pos = global_block * b + torch.arange(b, device=q.device)
        k_pos = torch.cat([torch.arange(j * b, (j + 1) * b, device=q.device) for j in union])
        mask = mask & (k_pos[None, :] <= q_pos[:, None])
    out, _ = attention_with_lse(q[:, :, i * b:(i + 1) * b], keys, values, scale=call.scale, mask=mask)
    return out

