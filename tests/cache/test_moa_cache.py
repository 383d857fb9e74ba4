"""moa_cache: MoA's elastic per-head spans as a ragged cache, loaded from the config moa_search writes."""

from __future__ import annotations

import json

import pytest
import torch

import attnzoo
from attnzoo import InvalidArgumentError
from attnzoo.cache import get_policy

transformers = pytest.importorskip("transformers")
from cache.test_compress import N, NEW, generate, prompt, tiny_llama


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def expected_budget(rules, sinks, n):
    """sinks + the widest span round(alpha + beta n) of a KV head's query heads, within [1, n]."""
    widest = max(min(n, max(1, round(a + b * n))) for a, b in rules)
    return min(n, sinks + widest)


def test_head_budgets_follow_the_rules():
    policy = get_policy("moa_cache", alpha=[0, 4], beta=[0.25, 0.0], sinks=2)
    assert policy.head_budgets(0, 2, 40) == [2 + 10, 2 + 4]
    assert policy.head_budgets(3, 2, 3) == [3, 3]  # never more than the tokens seen
    assert get_policy("moa_cache", alpha=8, beta=0.5, sinks=0).head_budgets(0, 3, 10) == [10, 10, 10]


def test_each_head_keeps_its_sinks_and_its_span(rng, llama):
    ids, mask = prompt(rng, batch=1)
    with attnzoo.compress(llama, "moa_cache", alpha=[0, 6], beta=[0.25, 0.0], sinks=3):
        _, cache = generate(llama, ids, mask, new=1)
    for layer in cache.layers:
        kept = [p[0].tolist() for p in layer.head_positions]
        assert kept == [[0, 1, 2] + list(range(N - 10, N)), [0, 1, 2] + list(range(N - 6, N))]


def test_the_search_config_loads_as_a_cache(rng, llama, tmp_path):
    pytest.importorskip("scipy")
    from attnzoo.cache.moa_search import moa_search

    calibration = torch.randint(1, 97, (1, 64), generator=rng)
    found = moa_search(llama, calibration, density=0.25, alphas=(0, 4, 8), betas=(0.0, 0.125, 0.25, 0.5), sinks=2, kv_groups=True,
                       path=tmp_path / "moa.json")
    rules = found["search"]["rules"]
    for layer, heads in rules.items():  # one rule per KV group of 2 query heads, within the average budget at each length
        assert heads[0] == heads[1] and heads[2] == heads[3]
        for n in found["search"]["lengths"]:
            assert sum(min(n, max(1, round(a + b * n))) for a, b in heads) <= 0.25 * n * 4 + 1e-9
    ids, mask = prompt(rng)
    for config in (str(tmp_path / "moa.json"), json.loads((tmp_path / "moa.json").read_text())):
        with attnzoo.compress(llama, "moa_cache", config=config):
            tokens, cache = generate(llama, ids, mask, new=NEW)
        assert tokens.shape == (2, NEW)
        for index, layer in enumerate(cache.layers):
            heads = rules[str(index)]
            assert layer.head_lengths() == [expected_budget(heads[h * 2:h * 2 + 2], 2, N) + NEW - 1 for h in range(2)]


def test_spans_wider_than_the_sequence_generate_what_dense_does(rng, llama):
    ids, mask = prompt(rng)
    dense, _ = generate(llama, ids, mask)
    with attnzoo.compress(llama, "moa_cache", alpha=1000, beta=0.0, sinks=4, interval=1):
        tokens, _ = generate(llama, ids, mask)
    assert torch.equal(tokens, dense)


def test_per_query_head_rules_keep_the_widest_of_a_group(llama):
    spec = {"method": "moa", "config": {"alpha": [0, 8, 2, 2], "beta": [0.5, 0.0, 0.0, 0.0], "sinks": 1}}
    config = {"format": "attnzoo-patterns/1", "layers": {"0": [spec] * 4, "1": [spec] * 4}}
    policy = get_policy("moa_cache", config=config)
    assert policy.head_budgets(1, 2, 40) == [1 + 20, 1 + 2]


def test_bad_configs_name_themselves(llama, tmp_path):
    spec = {"method": "moa", "config": {"alpha": [0, 0, 0, 0], "beta": [0.5] * 4, "sinks": 1}}
    cases = [
        ({"alpha": [1.0]}, "config"), ({"alpha": -1, "beta": 0.5}, "alpha"), ({"alpha": [1, 2], "beta": [0.5] * 3}, "beta"),
        ({"config": {"format": "other", "layers": {}}}, "config"), ({"config": str(tmp_path / "missing.json")}, "config"),
        ({"config": {"format": "attnzoo-patterns/1", "layers": {"0": [{"method": "dense"}]}}}, "config layers[0][0]"),
    ]
    for options, argument in cases:
        with pytest.raises(InvalidArgumentError) as e:
            get_policy("moa_cache", **options)
        assert e.value.argument == argument, options
    only_layer_0 = {"format": "attnzoo-patterns/1", "layers": {"0": [spec] * 4}}
    for options, argument in [({"config": only_layer_0}, "config"), ({"alpha": [1, 2, 3], "beta": 0.5}, "alpha, beta"),
                              ({"alpha": 4, "beta": 0.5, "budget": 16}, "ratio, budget")]:
        with pytest.raises(InvalidArgumentError) as e:
            attnzoo.compress(llama, "moa_cache", **options)
        assert e.value.argument == argument, options


def test_a_model_wide_budget_drops_no_more_than_per_layer_budgets(rng, llama):
    pytest.importorskip("scipy")
    from attnzoo.cache.moa_search import moa_search

    calibration = torch.randint(1, 97, (1, 64), generator=rng)
    grid = {"density": 0.25, "alphas": (0, 4, 8), "betas": (0.0, 0.125, 0.25, 0.5), "sinks": 2, "kv_groups": True}
    per_layer = moa_search(llama, calibration, **grid)
    whole = moa_search(llama, calibration, scope="model", **grid)
    assert whole["search"]["loss_total"] <= per_layer["search"]["loss_total"] + 1e-9
    for n in whole["search"]["lengths"]:  # the average span over all 8 heads of both layers stays within the budget
        spans = [min(n, max(1, round(a + b * n))) for heads in whole["search"]["rules"].values() for a, b in heads]
        assert sum(spans) <= 0.25 * n * len(spans) + 1e-9
    with pytest.raises(InvalidArgumentError) as e:
        moa_search(llama, calibration, scope="global")
    assert e.value.argument == "scope"
