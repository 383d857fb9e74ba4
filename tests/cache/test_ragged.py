"""Ragged caches (each KV head keeps its own number of keys, the layer attends itself) on tiny random-init llamas."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo import InvalidArgumentError, UnsupportedError

transformers = pytest.importorskip("transformers")
from attnzoo.integrations.transformers.compress import CompressedLayer, RaggedLayer, cache_argument, cache_bytes
from cache.test_compress import N, NEW, POLICIES, generate, prompt, tiny_llama


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def stored_bytes(layer: RaggedLayer) -> int:
    """What a ragged layer's per-head tensors hold, written out: per head h and row, S_h keys and
    values of 16 float32 dims and S_h int32 positions; plus one int64 real-token count per row."""
    batch = layer.real.shape[0]
    per_head = sum(batch * n * (16 * 4 * 2 + 4) for n in layer.head_lengths())
    accumulated = sum(batch * n * 4 for n in layer.head_lengths()) if layer.policy.cumulative else 0
    return per_head + accumulated + batch * 8


@pytest.mark.parametrize("name, options, heads, kv_heads", [(*p, 4, 2) for p in POLICIES] + [(*POLICIES[0], 4, 4)])
def test_keeping_everything_ragged_generates_what_dense_does(rng, name, options, heads, kv_heads):
    model = tiny_llama(heads, kv_heads)
    ids, mask = prompt(rng)
    dense, _ = generate(model, ids, mask)
    for settings in ({"ratio": 1.0, "interval": 1}, {"budget": N + NEW, "chunk": 7}):
        with attnzoo.compress(model, name, ragged=True, **settings, **options):
            tokens, cache = generate(model, ids, mask)
        assert torch.equal(tokens, dense), settings
        assert all(isinstance(layer, RaggedLayer) for layer in cache.layers)


@pytest.mark.parametrize("name, options", POLICIES)
def test_equal_budgets_keep_what_the_uniform_cache_keeps(rng, llama, name, options):
    ids, mask = prompt(rng)
    with attnzoo.compress(llama, name, budget=16, interval=4, **options):
        uniform, uniform_cache = generate(llama, ids, mask)
    with attnzoo.compress(llama, name, budget=16, interval=4, ragged=True, **options):
        ragged, ragged_cache = generate(llama, ids, mask)
    assert torch.equal(ragged, uniform)
    for flat, heads in zip(uniform_cache.layers, ragged_cache.layers):
        assert type(flat) is CompressedLayer and isinstance(heads, RaggedLayer)
        assert torch.equal(torch.stack(heads.head_positions, dim=1), flat.positions)


@pytest.mark.parametrize("name, options", [("snapkv", {"window": 4}), ("streaming_llm", {}), ("h2o", {})])
def test_per_head_budgets_store_per_head_lengths(rng, llama, name, options):
    ids, mask = prompt(rng)
    with attnzoo.compress(llama, name, budget=[8, 20], **options):
        _, cache = generate(llama, ids, mask)
    for layer in cache.layers:
        assert layer.head_lengths() == [8 + NEW - 1, 20 + NEW - 1]  # cut after the prompt, then every generated token fed back
        assert layer.keys.numel() == 0  # nothing stored in the (B, Hkv, S, D) tensors
    assert cache_bytes(cache) == sum(stored_bytes(layer) for layer in cache.layers)
    with attnzoo.compress(llama, name, budget=20, **options):
        _, uniform = generate(llama, ids, mask)
    assert cache_bytes(cache) < cache_bytes(uniform)


@pytest.mark.parametrize("name, options", [("snapkv", {"window": 4}), ("streaming_llm", {}), ("h2o", {})])
def test_per_head_ratios_keep_their_share_of_each_prompt(rng, llama, name, options):
    ids, mask = prompt(rng)
    ratios = [0.3, 0.7]
    budgets = [math.ceil(r * N) for r in ratios]  # of the longest row's N real tokens
    with attnzoo.compress(llama, name, ratio=ratios, **options):
        tokens, cache = generate(llama, ids, mask)
    with attnzoo.compress(llama, name, budget=budgets, **options):
        same, fixed = generate(llama, ids, mask)
    assert torch.equal(tokens, same)
    for layer, other in zip(cache.layers, fixed.layers):
        assert layer.head_lengths() == [b + NEW - 1 for b in budgets] == other.head_lengths()


def test_bad_per_head_ratios(llama):
    with pytest.raises(InvalidArgumentError) as e:
        attnzoo.compress(llama, "snapkv", ratio=[0.5, 0.5, 0.5])
    assert e.value.argument == "ratio" and "2 (one per KV head)" in str(e.value)
    with pytest.raises(InvalidArgumentError) as e:
        attnzoo.compress(llama, "snapkv", ratio=[0.5, 1.5])
    assert e.value.argument == "ratio[1]"
    with pytest.raises(UnsupportedError, match="same tokens on every head"):
        attnzoo.compress(llama, "selective", ratio=[0.25, 0.5])


@pytest.mark.parametrize("name, options", [("snapkv", {"window": 4}), ("h2o", {})])
def test_interval_cuts_each_head_back_to_its_budget(rng, llama, name, options):
    ids, mask = prompt(rng)
    with attnzoo.compress(llama, name, budget=[8, 14], interval=3, **options):
        _, cache = generate(llama, ids, mask, new=12)
    for layer in cache.layers:
        assert all(budget <= n < budget + 3 for n, budget in zip(layer.head_lengths(), [8, 14]))
        assert layer.get_seq_length() == N + 12 - 1


@pytest.mark.parametrize("name, options", [("snapkv", {"window": 4}), ("streaming_llm", {}), ("h2o", {})])
def test_padded_rows_generate_what_they_generate_alone(rng, llama, name, options):
    ids, mask = prompt(rng, pad=(0, 9))
    with attnzoo.compress(llama, name, budget=[12, 20], interval=3, **options):
        batched, _ = generate(llama, ids, mask)
        for row in range(2):
            real = mask[row].bool()
            alone, _ = generate(llama, ids[row:row + 1, real], mask[row:row + 1, real])
            assert torch.equal(batched[row:row + 1], alone), row


def test_chunked_prefill_bounds_every_head(rng, llama, monkeypatch):
    ids, mask = prompt(rng, n=64)
    held = []
    observe = RaggedLayer.observe

    def recording(self, *args):
        held.append(self.head_lengths())
        return observe(self, *args)

    monkeypatch.setattr(RaggedLayer, "observe", recording)
    with attnzoo.compress(llama, "snapkv", budget=[6, 12], chunk=8, window=4):
        generate(llama, ids, mask, new=2)
    assert max(a for a, _ in held) <= 6 + 8 and max(b for _, b in held) <= 12 + 8


def test_layers_keep_their_own_budgets(rng, llama):
    ids, mask = prompt(rng)
    layers = {0: ("snapkv", {"window": 4, "budget": 10}), 1: ("streaming_llm", {"budget": 24})}
    with attnzoo.compress(llama, layers=layers) as model:
        _, cache = generate(model, ids, mask, new=1)
    assert [layer.head_lengths() for layer in cache.layers] == [[10, 10], [24, 24]]
    with attnzoo.compress(llama, layers={0: ("h2o", {"ratio": 0.25}), 1: "h2o"}, ratio=0.5):
        _, cache = generate(llama, ids, mask, new=1)
    assert [layer.head_lengths() for layer in cache.layers] == [[10, 10], [20, 20]]  # of the longest row's 40 real tokens


def test_a_patched_prefill_runs_the_patch_method(rng, llama):
    ids, mask = prompt(rng, batch=1)
    with attnzoo.patch(llama, "sliding_window", window=8):
        patched, _ = generate(llama, ids, mask, new=1)
        with attnzoo.compress(llama, "snapkv", ratio=1.0, window=4, ragged=True):
            both, _ = generate(llama, ids, mask, new=1)
    with attnzoo.compress(llama, "snapkv", ratio=1.0, window=4, ragged=True):
        alone, _ = generate(llama, ids, mask, new=1)
    assert torch.equal(both, patched) and not torch.equal(alone, patched)


@pytest.mark.parametrize("kwargs, argument", [
    ({"budget": [8, 8, 8]}, "budget"), ({"budget": [8, 0]}, "budget[1]"), ({"budget": [8, 3]}, "budget"),
    ({"budget": [8, 12], "ragged": False}, "ragged"), ({"budget": 8, "ragged": "yes"}, "ragged"),
])
def test_bad_ragged_arguments_name_themselves(llama, kwargs, argument):
    with pytest.raises(InvalidArgumentError) as e:
        attnzoo.compress(llama, "snapkv", window=4, **kwargs)
    assert e.value.argument == argument


def test_bad_layer_sizes_and_policies(llama):
    with pytest.raises(InvalidArgumentError) as e:
        attnzoo.compress(llama, layers={0: ("h2o", {"ratio": 2.0}), 1: "h2o"}, ratio=0.5)
    assert e.value.argument == "layers[0] ratio"
    with pytest.raises(InvalidArgumentError) as e:
        attnzoo.compress(llama, layers={0: ("h2o", {"budget": 8}), 1: "h2o"}, ratio=0.5, ragged=False)
    assert e.value.argument == "ragged"
    with pytest.raises(UnsupportedError, match="same tokens on every head"):
        attnzoo.compress(llama, "selective", budget=[8, 12])


@pytest.mark.parametrize("name, options", [("snapkv", {"window": 4, "ratio": 1.0, "ragged": True}), ("diffqkv", {"k_heads": 2})])
def test_a_filled_dense_cache_is_adopted(rng, llama, name, options):
    ids = torch.randint(1, 97, (1, N), generator=rng)
    with torch.no_grad():
        whole = llama(input_ids=ids).logits[:, 30:]
        cache = transformers.DynamicCache(config=llama.config)
        argument = cache_argument(llama)
        llama(input_ids=ids[:, :30], **{argument: cache}, use_cache=True)
        with attnzoo.compress(llama, name, **options):
            rest = llama(input_ids=ids[:, 30:], **{argument: cache}, use_cache=True).logits
    assert isinstance(cache.layers[0], CompressedLayer)
    assert torch.allclose(rest, whole, atol=1e-4)
