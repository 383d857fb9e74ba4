"""Ring attention and Ulysses for exact (dense) attention over a sequence sharded across ranks.

Ring: each rank keeps its queries and passes its K/V block to the next rank W - 1 times
(``batch_isend_irecv``, the next block in flight while the current one is computed), joining the
partial results by log-sum-exp (:func:`attnzoo.merge_attention`); a causal block that no query may
see is not computed. Ulysses: one all-to-all turns sequence shards into head shards, any method
runs on whole sequences of H / W heads, and a second all-to-all turns the output back.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from ..kernels.dense import attention_with_lse, merge_attention, repeat_kv
from .comm import Group, Pending, attach, exchange
from .layout import positions


def causal_block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None | bool:
    """Causal mask of queries at ``q_pos`` over keys at ``k_pos``: None when every pair is allowed,
    False when none is, else the (Nq, Nk) bool mask."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if bool(allowed.all()):
        return None
    return allowed if bool(allowed.any()) else False


def ring_attention(q, k, v, group: Group, lengths: list[int], *, layout: str, causal: bool, scale: float) -> torch.Tensor:
    """This rank's output (B, Hq, n_r, Dv) of exact attention over every rank's K/V, by ring."""
    W, r = group.size, group.rank
    pos = [positions(lengths, p, layout, q.device) for p in range(W)]
    outs, lses, skipped = [], [], []
    block = (k, v)
    for step in range(W):
        source = (r - step) % W
        pending, incoming = None, None
        if step < W - 1:  # start passing the block on before computing with it
            pending = Pending()
            n_in = lengths[(source - 1) % W]
            shapes = [(peer_shape(t, n_in), t.dtype, t.device) for t in block]
            incoming = exchange(group, [((r + 1) % W, t) for t in block],
                                [((r - 1) % W, *shape) for shape in shapes], anchor=block[0], pending=pending)
        mask = causal_block_mask(pos[r], pos[source]) if causal else None
        if mask is not False:
            out, lse = attention_with_lse(q, *block, scale=scale, mask=mask)
            outs.append(out)
            lses.append(lse)
        else:
            skipped.extend(block)
        if pending is not None:
            pending.wait()
            block = tuple(incoming)
    out, _ = merge_attention(outs, lses)
    return attach(out.to(q.dtype), skipped)


def peer_shape(t: torch.Tensor, tokens: int) -> tuple[int, ...]:
    """The shape of a peer's shard of ``t`` (B, H, n, D) holding ``tokens`` tokens."""
    return (t.shape[0], t.shape[1], tokens, t.shape[3])


def _heads_split(group: Group, tensors, name: str) -> list[int]:
    heads = [t.shape[1] for t in tensors]
    for h in heads:
        if h % group.size:
            raise InvalidArgumentError(name, f"head counts divisible by the {group.size} ranks (strategy='ulysses' "
                                       "splits heads across ranks; use strategy='ring')", f"q, k, v heads {heads}")
    return [h // group.size for h in heads]


def sequence_to_heads(group: Group, tensors, lengths: list[int]) -> list[torch.Tensor]:
    """All-to-all: each (B, H, n_r, D) sequence shard -> (B, H / W, N, D), this rank's heads over every
    rank's tokens, concatenated in rank order."""
    W, r = group.size, group.rank
    per_rank = _heads_split(group, tensors, "q, k, v")
    sends, receives = [], []
    for t, h in zip(tensors, per_rank):
        for p in range(W):
            if p != r:
                sends.append((p, t[:, p * h:(p + 1) * h]))
                receives.append((p, (t.shape[0], h, lengths[p], t.shape[3]), t.dtype, t.device))
    got = iter(exchange(group, sends, receives, anchor=tensors[0]))
    out = []
    for t, h in zip(tensors, per_rank):
        parts = [t[:, r * h:(r + 1) * h] if p == r else next(got) for p in range(W)]
        out.append(torch.cat(parts, dim=2))
    return out


def heads_to_sequence(group: Group, out: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The inverse all-to-all: (B, H / W, N, Dv) in rank order -> this rank's (B, H, n_r, Dv)."""
    W, r = group.size, group.rank
    pieces = out.split(lengths, dim=2)
    B, h, _, Dv = out.shape
    received = iter(exchange(group, [(p, pieces[p]) for p in range(W) if p != r],
                             [(p, (B, h, lengths[r], Dv), out.dtype, out.device) for p in range(W) if p != r], anchor=out))
    return torch.cat([pieces[r] if p == r else next(received) for p in range(W)], dim=1)


def ulysses_attention(q, k, v, method, group: Group, lengths: list[int], *, layout: str, causal: bool,
                      scale: float) -> torch.Tensor:
    """This rank's output (B, Hq, n_r, Dv): ``method`` run on whole sequences of Hq / W heads (with
    fewer key/value heads than ranks, each is repeated so every rank gets the one its queries use)."""
    if k.shape[1] % group.size and group.size % k.shape[1] == 0 and q.shape[1] % group.size == 0:
        k, v = repeat_kv(k, group.size // k.shape[1]), repeat_kv(v, group.size // k.shape[1])
    qh, kh, vh = sequence_to_heads(group, (q, k, v), lengths)
    order = torch.cat([positions(lengths, p, layout, q.device) for p in range(group.size)])
    natural = torch.argsort(order)  # rank order -> sequence order (identity for contiguous shards)
    qh, kh, vh = (t.index_select(2, natural) for t in (qh, kh, vh))
    out = method(qh, kh, vh, causal=causal, scale=scale, check_finite=False)
    return heads_to_sequence(group, out.index_select(2, order), lengths)
