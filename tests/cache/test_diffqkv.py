"""diffqkv: fewer (merged) K heads than V heads and selective V loading, against references written out."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo import InvalidArgumentError
from attnzoo.cache import get_policy
from attnzoo.cache.attend import head_attention
from attnzoo.cache.diffqkv import key_groups, merge_keys

transformers = pytest.importorskip("transformers")
from attnzoo.integrations.transformers.compress import Budget, DiffQKVLayer, cache_bytes
from cache.test_compress import N, NEW, generate, prompt, tiny_llama


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def test_key_groups_are_contiguous():
    assert key_groups(3, 1) == [0, 0, 0]
    assert key_groups(4, 2) == [0, 0, 1, 1]
    assert key_groups(3, 2) == [0, 0, 1]
    with pytest.raises(InvalidArgumentError) as e:
        key_groups(2, 3)
    assert e.value.argument == "k_heads"


def test_merged_keys_are_the_mean_of_each_group(rng):
    keys = torch.randn(2, 3, 5, 4, generator=rng)
    merged = merge_keys(keys, 2)
    assert torch.allclose(merged[:, 0], (keys[:, 0] + keys[:, 1]) / 2)
    assert torch.allclose(merged[:, 1], keys[:, 2])


def reference_row(q, keys, values, visible, scale, top):
    """One query row: softmax over the ``top`` highest visible logits (all when None), their values summed."""
    logits = {j: float(q @ keys[j]) * scale for j in range(keys.shape[0]) if visible[j]}
    kept = sorted(logits, key=logits.get, reverse=True)[:top] if top is not None else list(logits)
    peak = max(logits[j] for j in kept)
    weights = {j: math.exp(logits[j] - peak) for j in kept}
    total = sum(weights.values())
    return sum(weights[j] / total * values[j] for j in kept)


@pytest.mark.parametrize("top", [None, 3])
def test_selective_values_match_the_definition(rng, top):
    B, G, Nq, S, D = 2, 2, 3, 9, 4
    queries, keys, values = torch.randn(B, G, Nq, D, generator=rng), torch.randn(B, S, D, generator=rng), torch.randn(B, S, 5, generator=rng)
    positions = torch.arange(S, dtype=torch.int32).repeat(B, 1)
    positions[1, :2] = -1  # row 1 starts with padding
    got = head_attention(queries, keys, values, positions, 0.5, v_top=top)
    for b in range(B):
        for g in range(G):
            for i in range(Nq):
                visible = [bool(positions[b, j] >= 0) and j <= S - Nq + i for j in range(S)]
                expected = reference_row(queries[b, g, i], keys[b], values[b], visible, 0.5, top)
                assert torch.allclose(got[b, g, i], expected, atol=1e-5), (b, g, i)


def test_the_layer_scores_merged_keys_and_reads_every_value_head(rng):
    policy = get_policy("diffqkv", k_heads=1)
    layer = DiffQKVLayer(policy, Budget(None, None, 1, None), 0)
    keys, values = torch.randn(1, 2, 6, 8, generator=rng), torch.randn(1, 2, 6, 8, generator=rng)
    layer.update(keys, values)
    queries = torch.randn(1, 4, 6, 8, generator=rng)
    out = layer.observe(queries, None, 8 ** -0.5)
    shared = (keys[:, 0] + keys[:, 1]) / 2
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    for head in range(4):
        logits = (queries[0, head] @ shared[0].T * 8 ** -0.5).masked_fill(~causal, float("-inf"))
        expected = torch.softmax(logits, dim=-1) @ values[0, head // 2]
        assert torch.allclose(out[0, head], expected, atol=1e-5), head
    assert layer.keys.shape == (1, 1, 6, 8) and layer.values.shape == (1, 2, 6, 8)


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4)])
def test_no_merge_and_no_selection_generates_what_dense_does(rng, heads, kv_heads):
    model = tiny_llama(heads, kv_heads)
    ids, mask = prompt(rng)
    dense, _ = generate(model, ids, mask)
    for options in ({"k_heads": kv_heads}, {"k_heads": kv_heads, "v_top": N + NEW}):
        with attnzoo.compress(model, "diffqkv", **options):
            tokens, _ = generate(model, ids, mask)
        assert torch.equal(tokens, dense), options


def test_merged_keys_hold_fewer_bytes(rng, llama):
    ids, mask = prompt(rng)
    _, dense = generate(llama, ids, mask)
    with attnzoo.compress(llama, "diffqkv", k_heads=1, v_top=8):
        tokens, cache = generate(llama, ids, mask)
    held = N + NEW - 1
    # per layer: 1 K head and 2 V heads of 16 float32 dims, int32 positions, per row; one int64 count per row
    assert cache_bytes(cache) == 2 * (2 * held * (16 * 4 * 3 + 4) + 2 * 8)
    assert cache_bytes(dense) == 2 * 2 * held * 16 * 4 * 4
    assert tokens.shape == (2, NEW)


def test_padded_rows_generate_what_they_generate_alone(rng, llama):
    ids, mask = prompt(rng, pad=(0, 9))
    with attnzoo.compress(llama, "diffqkv", k_heads=1, v_top=6):
        batched, _ = generate(llama, ids, mask)
        for row in range(2):
            real = mask[row].bool()
            alone, _ = generate(llama, ids[row:row + 1, real], mask[row:row + 1, real])
            assert torch.equal(batched[row:row + 1], alone), row


@pytest.mark.parametrize("kwargs, argument", [({"k_heads": 3}, "k_heads"), ({"k_heads": 0}, "k_heads"), ({"v_top": 0}, "v_top"),
                                              ({"ratio": 0.5}, "ratio, budget")])
def test_bad_arguments_name_themselves(llama, kwargs, argument):
    with pytest.raises(InvalidArgumentError) as e:
        attnzoo.compress(llama, "diffqkv", **kwargs)
    assert e.value.argument == argument
