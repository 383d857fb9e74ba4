"""Ring attention and Ulysses for exact (dense) attention over a sequence sharded across ranks.

Ring: each rank keeps its queries and passes its K/V block to the next rank W - 1 times
(``batch_isend_irecv``, the next block in flight while the current one is computed), joining the
partial results by log-sum-exp (:func:`attnzoo.merge_attention`); a causal block that no query may
see is not computed. The backward is a second ring (blockwise, from the saved log-sum-exp). Ulysses: one all-to-all turns sequence shards into head shards, any method
runs on whole sequences of H / W heads, and a second all-to-all turns the output back.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from ..kernels.dense import attention_with_lse, merge_attention, repeat_kv
from .comm import Group, Pending, exchange
from .layout import positions


def causal_block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None | bool:
    """Causal mask of queries at ``q_pos`` over keys at ``k_pos``: None when every pair is allowed,
    False when none is, else the (Nq, Nk) bool mask."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if bool(allowed.all()):
        return None
    return allowed if bool(allowed.any()) else False


def ring_attention(q, k, v, group: Group, lengths: list[int], *, layout: str, causal: bool, scale: float) -> torch.Tensor:
    """This rank's output (B, Hq, n_r, Dv) of exact attention over every rank's K/V, by ring;
    differentiable by a second ring (:class:`_RingAttention`). Every rank must backpropagate
    through its output (each backward step waits for the neighbours')."""
    pos = [positions(lengths, p, layout, q.device) for p in range(group.size)]
    mask = (lambda source: causal_block_mask(pos[group.rank], pos[source])) if causal else (lambda source: None)
    return _RingAttention.apply(q, k, v, group, lengths, mask, scale)


def _shift(group: Group, tensors, tokens: int, pending: Pending | None = None) -> list[torch.Tensor]:
    """Send ``tensors`` to the next rank and receive the previous rank's, ``tokens`` long."""
    W, r = group.size, group.rank
    return exchange(group, [((r + 1) % W, t) for t in tensors],
                    [((r - 1) % W, peer_shape(t, tokens), t.dtype, t.device) for t in tensors], anchor=tensors[0], pending=pending)


def _ring_steps(group: Group, lengths: list[int], k, v):
    """Yield (source rank, its K, its V) around the ring, the next block in flight meanwhile."""
    W, r = group.size, group.rank
    block = (k, v)
    for step in range(W):
        source = (r - step) % W
        pending = Pending() if step < W - 1 else None
        incoming = _shift(group, block, lengths[(source - 1) % W], pending) if pending else None
        yield source, block
        if pending is not None:
            pending.wait()
            block = tuple(incoming)


class _RingAttention(torch.autograd.Function):
    """``mask_of(source)``: the causal mask of this rank's queries over that rank's keys (None: all,
    False: none), built at each step. Forward: partial attention per K/V block, merged by
    log-sum-exp. Backward: the blocks go
    around again with their dK/dV accumulators, each rank adding its queries' share (from the
    saved log-sum-exp, O(n_r n_p) memory per step), and the accumulators end at their owners."""

    @staticmethod
    def forward(ctx, q, k, v, group, lengths, mask_of, scale):
        outs, lses = [], []
        for source, block in _ring_steps(group, lengths, k, v):
            mask = mask_of(source)
            if mask is not False:
                out, lse = attention_with_lse(q, *block, scale=scale, mask=mask)
                outs.append(out)
                lses.append(lse)
        out, lse = merge_attention(outs, lses)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.lengths, ctx.mask_of, ctx.scale = group, lengths, mask_of, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        group, lengths = ctx.group, ctx.lengths
        grad_out = grad_out.to(out.dtype)
        delta = (grad_out * out).sum(-1)  # (B, Hq, n): rowsum(dO * O)
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # rows with no key: probabilities 0
        grad_q = torch.zeros_like(q, dtype=out.dtype)
        grads = (torch.zeros_like(k, dtype=out.dtype), torch.zeros_like(v, dtype=out.dtype))
        for source, block in _ring_steps(group, lengths, k, v):
            mask = ctx.mask_of(source)
            if mask is not False:
                gq, gk, gv = _block_grads(q, *block, grad_out, lse, delta, mask, ctx.scale)
                grad_q += gq
                grads = (grads[0] + gk, grads[1] + gv)
            # the accumulators travel with their block; after the last step they arrive home
            grads = tuple(_shift(group, grads, lengths[(source - 1) % group.size]))
        return grad_q.to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype), None, None, None, None


def _block_grads(q, k, v, grad_out, lse, delta, mask, scale: float):
    """Gradients of q, k, v from one K/V block, given the whole row's log-sum-exp ``lse`` and
    ``delta`` = rowsum(dO * O): P = exp(S - lse), dV = P^T dO, dS = P (dO V^T - delta)."""
    work = lse.dtype
    groups = q.shape[1] // k.shape[1]
    kr, vr = repeat_kv(k, groups).to(work), repeat_kv(v, groups).to(work)
    qw = q.to(work)
    logits = qw @ kr.transpose(-1, -2) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.exp(logits - lse[..., None])
    grad_v = probs.transpose(-1, -2) @ grad_out
    grad_s = probs * (grad_out @ vr.transpose(-1, -2) - delta[..., None])
    grad_q = grad_s @ kr * scale
    grad_k = grad_s.transpose(-1, -2) @ qw * scale
    fold = lambda t: t.unflatten(1, (k.shape[1], groups)).sum(2)  # noqa: E731  (query heads -> their key head)
    return grad_q, fold(grad_k), fold(grad_v)


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
