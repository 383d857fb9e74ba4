"""Cache policies' scores against literal references written from the papers (loops, no shared code)."""

from __future__ import annotations

import math

import pytest
import torch

from attnzoo import InvalidArgumentError
from attnzoo.cache import get_policy, list_policies
from attnzoo.cache.base import CacheView


def view(rng, *, B=1, Hq=4, Hkv=2, N=20, D=8, window=4, budget=8, positions=None, accumulated=None):
    keys = torch.randn(B, Hkv, N, D, generator=rng)
    values = torch.randn(B, Hkv, N, D, generator=rng)
    queries = torch.randn(B, Hq, window, D, generator=rng)
    if positions is None:
        positions = torch.arange(N, dtype=torch.int32).expand(B, Hkv, N)
    return CacheView(queries, keys, values, positions, D ** -0.5, budget, accumulated)


def reference_votes(v: CacheView) -> list:
    """votes[b][h][j]: softmax weight key j gets from each window query of head h's group (causal, padding skipped)."""
    B, Hq, W, _ = v.queries.shape
    Hkv, N = v.keys.shape[1], v.keys.shape[2]
    out = [[[0.0] * N for _ in range(Hkv)] for _ in range(B)]
    for b in range(B):
        for hq in range(Hq):
            h = hq // (Hq // Hkv)
            for i in range(W):
                pos = N - W + i
                seen = [j for j in range(pos + 1) if int(v.positions[b, h, j]) >= 0]
                logits = {j: float(v.queries[b, hq, i] @ v.keys[b, h, j]) * v.scale for j in seen}
                if not logits:
                    continue
                top = max(logits.values())
                total = sum(math.exp(x - top) for x in logits.values())
                for j, x in logits.items():
                    out[b][h][j] += math.exp(x - top) / total
    return out


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_snapkv_score_matches_the_paper(rng, pooling):
    v = view(rng, B=2)
    kernel, window = 5, v.queries.shape[2]
    got = get_policy("snapkv", window=window, kernel=kernel, pooling=pooling).score(v)
    votes = reference_votes(v)
    N = v.keys.shape[2]
    for b in range(2):
        for h in range(2):
            for j in range(N - window):
                near = [votes[b][h][t] for t in range(max(0, j - kernel // 2), min(N, j + kernel // 2 + 1))]
                expected = max(near) if pooling == "max" else sum(near) / len(near)
                assert got[b, h, j].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
            assert torch.isinf(got[b, h, N - window:]).all()  # the observation window is always kept


def test_h2o_keeps_recent_and_heavy(rng):
    N, budget = 16, 8
    acc = torch.rand(1, 2, N, generator=rng)
    v = view(rng, N=N, budget=budget, accumulated=acc)
    got = get_policy("h2o", recent=0.25).score(v)
    recent = int(0.25 * budget)
    assert torch.isinf(got[..., N - recent:]).all()
    assert torch.equal(got[..., :N - recent], acc[..., :N - recent])


def test_streaming_llm_scores_sinks_then_recency(rng):
    positions = torch.tensor([-1, -1, 0, 1, 2, 3, 4, 5], dtype=torch.int32).expand(1, 2, 8)
    got = get_policy("streaming_llm", sinks=2).score(view(rng, N=8, positions=positions))
    assert torch.isinf(got[..., 2:4]).all()  # the first two real tokens, not the padding
    assert (got[..., 4:].diff(dim=-1) > 0).all()


def test_policies_are_registered_with_papers():
    names = {info.name: info for info in list_policies()}
    for name in ("snapkv", "streaming_llm", "h2o", "selective", "moa_cache", "diffqkv"):
        assert names[name].arxiv and "decode" in names[name].family


@pytest.mark.parametrize("name, options, argument", [
    ("snapkv", {"kernel": 4}, "kernel"), ("snapkv", {"pooling": "mean"}, "pooling"), ("snapkv", {"window": 0}, "window"),
    ("h2o", {"recent": 1.5}, "recent"), ("streaming_llm", {"sinks": -1}, "sinks"),
])
def test_bad_policy_options_name_the_argument(name, options, argument):
    with pytest.raises(InvalidArgumentError) as e:
        get_policy(name, **options)
    assert e.value.argument == argument


def test_selective_accumulates_relu_logits_of_one_head(rng):
    B, Hkv, N, Nq = 1, 2, 10, 6
    positions = torch.tensor([-1, -1, 0, 1, 2, 3, 4, 5, 6, 7], dtype=torch.int32).expand(B, Hkv, N)
    v = view(rng, N=N, window=Nq, positions=positions)
    policy = get_policy("selective", head=2)  # query head 2 reads kv head 1
    got = policy.accumulate(v.queries, v.keys, positions, v.scale)
    for j in range(N):
        expected = 0.0
        for i in range(Nq):
            pos = N - Nq + i
            if j < pos and int(positions[0, 0, j]) > 0 and int(positions[0, 0, pos]) >= 0:
                expected += max(0.0, float(v.queries[0, 2, i] @ v.keys[0, 1, j]) * v.scale)
        assert got[0, 0, j].item() == pytest.approx(expected, abs=1e-5)
        assert got[0, 1, j].item() == pytest.approx(expected, abs=1e-5)  # one selection for every head
    v.accumulated = got
    score = policy.score(v)
    assert torch.isinf(score[..., 2]).all() and torch.equal(score[..., 3:], -got[..., 3:])
