"""HyperAttention: fast path (pieces merged by log-sum-exp) vs one dense softmax with the same
log-weights, exact settings vs dense, the causal recursion's coverage, determinism, dtypes."""

from __future__ import annotations

import pytest
import torch
from helpers import qkv, rel_err

import attnzoo
from attnzoo.errors import InvalidArgumentError
from attnzoo.kernels.dense import sdpa

SMALL = dict(block_size=16, sample_size=8, min_seq_len=40)


@pytest.mark.parametrize("n", [256, 301])
@pytest.mark.parametrize("causal", [True, False])
def test_fast_path_equals_reference(n, causal, rng):
    m = attnzoo.get_method("hyper", **SMALL)
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=n, D=16, Dv=8)
    out, stats = m(q, k, v, causal=causal, return_stats=True)
    assert out.shape == (2, 4, n, 8)
    assert rel_err(out, m.reference(q, k, v, causal=causal)) <= 1e-4, rng.initial_seed()
    support = m.support(q, k, v, causal=causal)
    area = n * (n + 1) / 2 if causal else n * n
    assert stats.density == pytest.approx(float(support.float().sum(dim=(-1, -2)).mean()) / area, rel=1e-6)
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


def test_seeded_and_deterministic(rng):
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, Nq=200, D=16)
    a, b = attnzoo.get_method("hyper", **SMALL), attnzoo.get_method("hyper", **SMALL)
    assert torch.equal(a(q, k, v, causal=True), b(q, k, v, causal=True))
    other = attnzoo.get_method("hyper", **SMALL, seed=1)
    assert not torch.equal(a.support(q, k, v), other.support(q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype, rng):
    m = attnzoo.get_method("hyper", **SMALL)
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=128, D=16, dtype=dtype)
    out = m(q, k, v, causal=True)
    assert out.dtype == dtype and rel_err(out, m.reference(q, k, v, causal=True)) <= 2e-2


def test_errors(rng):
    with pytest.raises(InvalidArgumentError, match="sample_size"):
        attnzoo.get_method("hyper", sample_size=0)
    with pytest.raises(InvalidArgumentError, match="min_seq_len"):
        attnzoo.get_method("hyper", min_seq_len=1)
    q, k, v = qkv(rng, Nq=20, Nk=40, D=16)
    with pytest.raises(attnzoo.UnsupportedError, match="self-attention"):
        attnzoo.attention(q, k, v, "hyper")
