"""HyperAttention beyond the contract suite (tests/contract): the LSH pieces are sparse, the causal
recursion's coverage, exact settings vs dense, and the seed."""

from __future__ import annotations

import pytest
import torch
from helpers import qkv, rel_err

import attnzoo
from attnzoo.kernels.dense import sdpa

SMALL = dict(block_size=16, sample_size=8, min_seq_len=40)


@pytest.mark.parametrize("n", [256, 301])
@pytest.mark.parametrize("causal", [True, False])
def test_lsh_pieces_keep_under_half_of_the_scores(n, causal, rng):
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=n, D=16, Dv=8)
    _, stats = attnzoo.get_method("hyper", **SMALL)(q, k, v, causal=causal, return_stats=True)
    assert stats.density < 0.5


def test_causal_recursion_covers_the_diagonal_and_stays_causal(rng):
    m = attnzoo.get_method("hyper", **SMALL)
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=301, D=16)
    support = m.support(q, k, v, causal=True)[0]
    assert torch.all(support.diagonal(dim1=-2, dim2=-1))  # every query sees itself
    assert not torch.any(support & ~torch.ones(301, 301, dtype=torch.bool).tril())


@pytest.mark.parametrize("causal", [True, False])
def test_exact_settings_equal_dense(causal, rng):
    q, k, v = qkv(rng, Nq=150, D=16)
    for cfg in (dict(min_seq_len=150), dict(block_size=150, sample_size=8, min_seq_len=40)):
        out = attnzoo.get_method("hyper", **cfg)(q, k, v, causal=causal)
        assert rel_err(out, sdpa(q, k, v, causal=causal, scale=0.25)) <= 1e-5, cfg


def test_another_seed_draws_another_support(rng):
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, Nq=200, D=16)
    seeded, other = attnzoo.get_method("hyper", **SMALL), attnzoo.get_method("hyper", **SMALL, seed=1)
    assert not torch.equal(seeded.support(q, k, v), other.support(q, k, v))
