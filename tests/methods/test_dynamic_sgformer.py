"""SG-Former beyond the contract suite (tests/contract): the token budget bounds the density, no
sparse support, degenerate settings vs dense, salient regions kept finer."""

from __future__ import annotations

import pytest
import torch
from contract.cases import CASES
from helpers import qkv, rel_err

import attnzoo
from attnzoo.kernels.dense import sdpa

SGFORMER = [case for case in CASES if case.method == "sgformer"]


@pytest.mark.parametrize("case", SGFORMER, ids=[c.id for c in SGFORMER])
def test_density_is_at_most_the_token_budget_and_there_is_no_support(case, rng):
    m = case.make()
    q, k, v = case.inputs(rng)
    _, stats = m(q, k, v, return_stats=True)
    assert stats.density <= case.config["num_tokens"] / case.length
    assert m.support(q, k, v) is None  # pooled keys: no sparse support


def test_one_region_and_one_token_per_key_is_dense(rng):
    q, k, v = qkv(rng, Nq=96, D=16)
    out = attnzoo.get_method("sgformer", n_win=1, num_tokens=96)(q, k, v)
    assert rel_err(out, sdpa(q, k, v, causal=False, scale=0.25)) <= 1e-5


@pytest.mark.parametrize("reallocation", ["runs", "tiers"])
def test_salient_region_keeps_more_tokens(reallocation, rng):
    """Keys of the middle region point along the queries: it receives the attention mass, so its
    tokens merge into the smallest new tokens (on average over the region's tokens, at most half
    the size of any other region's)."""
    q, k, v = qkv(rng, B=1, Hq=1, Hkv=1, Nq=128, D=16)
    direction = torch.randn(16, generator=rng)
    q = q * 0.1 + direction
    k = k * 0.1
    k[:, :, 64:80] += 2 * direction
    m = attnzoo.get_method("sgformer", n_win=8, num_tokens=16, reallocation=reallocation)
    ids = m.groups(q, k, m._prepare(q, k, v, False, None))[0, 0]
    group_size = torch.bincount(ids, minlength=16)[ids].double()  # size of the new token holding each token
    per_region = [float(group_size[r * 16:(r + 1) * 16].mean()) for r in range(8)]
    assert all(2 * per_region[4] <= size for r, size in enumerate(per_region) if r != 4), per_region
