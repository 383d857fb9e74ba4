"""MoA's profiling search: the dropped attention mass against loops, the MILP against brute force, the config patch loads."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import attnzoo
from attnzoo import InvalidArgumentError
from attnzoo.cache.moa_search import choose_rules, dropped_mass, moa_search, rule_spans

pytest.importorskip("scipy")


def causal_probs(rng, heads=2, n=12):
    logits = torch.randn(heads, n, n, generator=rng)
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(logits, dim=-1)


def test_dropped_mass_matches_loops(rng):
    probs = causal_probs(rng)
    lengths, sinks = [6, 12], 2
    rules, spans = rule_spans([0, 3], [0.0, 0.5], lengths)
    got = dropped_mass(probs, spans, lengths, sinks)
    for h in range(2):
        for r in range(len(rules)):
            expected = 0.0
            for l, n in enumerate(lengths):
                span = int(spans[r, l])
                lost = [sum(float(probs[h, i, j]) for j in range(i + 1) if not (j < sinks or j > i - span)) for i in range(n)]
                expected += sum(lost) / n
            assert got[h, r] == pytest.approx(expected, abs=1e-6)  # probs are float32


def test_milp_choice_is_the_brute_force_optimum(rng):
    gen = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=rng)))
    losses = gen.random((3, 4))
    spans = gen.integers(1, 10, size=(4, 2)).astype(float)
    limits = np.array([15.0, 16.0])
    best = min((c for c in itertools.product(range(4), repeat=3) if all(sum(spans[r, l] for r in c) <= limits[l] for l in range(2))),
               key=lambda c: sum(losses[h, r] for h, r in enumerate(c)), default=None)
    if best is None:
        with pytest.raises(InvalidArgumentError):
            choose_rules(losses, spans, limits)
        return
    picks = choose_rules(losses, spans, limits)
    assert sum(losses[h, r] for h, r in enumerate(picks)) == pytest.approx(sum(losses[h, r] for h, r in enumerate(best)))


def test_search_writes_a_config_patch_runs(rng, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 97, (1, 64), generator=rng)
    found = moa_search(model, ids, density=0.25, alphas=(0, 8), betas=(0.0, 0.125, 0.25), sinks=4, path=tmp_path / "moa.json")
    assert found["search"]["dropped_mass"] <= found["search"]["dropped_mass_uniform"] + 1e-9
    with attnzoo.patch(model, "auto", config=str(tmp_path / "moa.json")):
        out = model(input_ids=ids).logits
    assert torch.isfinite(out).all()
    with pytest.raises(InvalidArgumentError):
        moa_search(model, ids, density=0.0)
