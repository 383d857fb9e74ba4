"""SG-Former's significance-guided token reallocation: fast path vs reference, degenerate settings
vs dense, salient regions kept finer, determinism, dtypes, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import qkv, rel_err

import attnzoo
from attnzoo.errors import InvalidArgumentError
from attnzoo.kernels.dense import sdpa


@pytest.mark.parametrize("cfg,n", [(dict(n_win=4, num_tokens=20, grid=(16, 12)), 192), (dict(n_win=6, num_tokens=9), 150)])
def test_fast_path_equals_reference(cfg, n, rng):
    m = attnzoo.get_method("sgformer", **cfg)
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=n, D=16, Dv=8)
    out, stats = m(q, k, v, return_stats=True)
    assert out.shape == (2, 4, n, 8)
    assert rel_err(out, m.reference(q, k, v)) <= 1e-4, rng.initial_seed()
    assert stats.density <= cfg["num_tokens"] / n and stats.selection_ms > 0
    assert m.support(q, k, v) is None  # pooled keys: no sparse support


def test_one_region_and_one_token_per_key_is_dense(rng):
    q, k, v = qkv(rng, Nq=96, D=16)
    out = attnzoo.get_method("sgformer", n_win=1, num_tokens=96)(q, k, v)
    assert rel_err(out, sdpa(q, k, v, causal=False, scale=0.25)) <= 1e-5


def test_salient_region_keeps_more_tokens(rng):
    """Keys of the middle region point along the queries: it receives the attention mass, so it
    is split into more (smaller) new tokens than any other region."""
    q, k, v = qkv(rng, B=1, Hq=1, Hkv=1, Nq=128, D=16)
    direction = torch.randn(16, generator=rng)
    q = q * 0.1 + direction
    k = k * 0.1
    k[:, :, 64:80] += 2 * direction
    m = attnzoo.get_method("sgformer", n_win=8, num_tokens=16)
    ids = m.groups(q, k, m._prepare(q, k, v, False, None))[0, 0]
    per_region = [len(set(ids[r * 16:(r + 1) * 16].tolist())) for r in range(8)]
    assert per_region[4] == max(per_region) and per_region[4] > 2 * min(per_region), per_region


def test_deterministic_and_low_precision(rng):
    m = attnzoo.get_method("sgformer", n_win=4, num_tokens=12)
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, Nq=64, D=16)
    assert torch.equal(m(q, k, v), m(q, k, v))
    for dtype in (torch.bfloat16, torch.float16):
        lq, lk, lv = q.to(dtype), k.to(dtype), v.to(dtype)
        out = m(lq, lk, lv)
        assert out.dtype == dtype and rel_err(out, m.reference(lq, lk, lv)) <= 2e-2


def test_gradients_match_reference(rng):
    m = attnzoo.get_method("sgformer", n_win=4, num_tokens=10)
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, Nq=64, D=8, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(1, 2, 64, 8, generator=rng, dtype=torch.float64)
    got = torch.autograd.grad((m(q, k, v) * grad_out).sum(), (q, k, v))
    want = torch.autograd.grad((m.reference(q, k, v) * grad_out).sum(), (q, k, v))
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-8


def test_errors(rng):
    q, k, v = qkv(rng, Nq=60, D=16)
    with pytest.raises(InvalidArgumentError, match="num_tokens"):
        attnzoo.get_method("sgformer", num_tokens=0)
    with pytest.raises(InvalidArgumentError, match="n_win"):
        attnzoo.attention(q, k, v, "sgformer", n_win=7)
    with pytest.raises(InvalidArgumentError, match="grid"):
        attnzoo.attention(q, k, v, "sgformer", grid=(7, 7))
    with pytest.raises(attnzoo.UnsupportedError, match="causal"):
        attnzoo.attention(q, k, v, "sgformer", causal=True)
