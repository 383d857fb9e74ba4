"""sparsifiner and moh: what their learned parts select, checked against direct computations."""

from __future__ import annotations

import torch
from helpers import qkv

import attnzoo


def test_sparsifiner_at_full_rank_keeps_the_exact_top_keys(rng):
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, Nq=40, Nk=40, D=8)
    method = attnzoo.get_method("sparsifiner", density=0.25, rank=8)  # identity init at full rank: the exact logits
    support = method.support(q, k, v)
    logits = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)
    exact = torch.zeros_like(support).scatter_(-1, logits.topk(10, dim=-1).indices, True)
    assert torch.equal(support, exact) and int(support.sum(-1).unique()) == 10


def test_sparsifiner_predictor_changes_the_selection(rng):
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=32, Nk=32, D=8)
    method = attnzoo.get_method("sparsifiner", density=0.25, rank=4)
    method.materialize(2, 2, 8, 8)
    before = method.support(q, k, v)
    with torch.no_grad():
        method.predictor.key.neg_()  # the opposite ranking
    assert not torch.equal(method.support(q, k, v), before)


def test_moh_weights_keep_shared_heads_and_the_active_share(rng):
    q, k, v = qkv(rng, B=2, Hq=8, Hkv=2, Nq=24, Nk=24, D=8)
    method = attnzoo.get_method("moh", active=0.75, shared=2)
    method.materialize(8, 2, 8, 8)
    with torch.no_grad():
        method.router.weight.normal_(generator=rng)
    weights = method.head_weights(q)  # (B, H, N)
    assert torch.equal(weights[:, :2], torch.ones_like(weights[:, :2]))
    assert torch.equal((weights > 0).sum(1), torch.full((2, 24), 6))  # ceil(0.75 * 8) heads per token
    torch.testing.assert_close(weights[:, 2:].sum(1), torch.full((2, 24), 4.0))  # routed weights sum to their count
    out = method(q, k, v, causal=True)
    dense = attnzoo.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, dense * weights[..., None])
