"""attnzoo.compress on tiny random-init llamas built from configs: generation, padding, GQA, chunks, errors."""

from __future__ import annotations

import inspect

import pytest
import torch

import attnzoo
from attnzoo import InvalidArgumentError, UnknownNameError, UnsupportedError

transformers = pytest.importorskip("transformers")
from attnzoo.integrations.transformers import compress as compress_module
from attnzoo.integrations.transformers.adapter import CAPTURE_ATTR
from attnzoo.integrations.transformers.compress import CompressedLayer, cache_bytes

VOCAB, N, NEW = 97, 40, 8
POLICIES = [("snapkv", {"window": 4}), ("streaming_llm", {}), ("h2o", {}), ("selective", {})]


def tiny_llama(heads=4, kv_heads=2, sharpness=4.0):
    """A random-init llama whose query and key projections are scaled by ``sharpness``: attention
    far from uniform, so which keys a policy keeps is not decided by rounding among near-ties."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpness)
            layer.self_attn.k_proj.weight.mul_(sharpness)
    return model


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def prompt(rng, batch=2, n=N, pad=(0, 11)):
    ids = torch.randint(1, VOCAB, (batch, n), generator=rng)
    mask = torch.ones(batch, n, dtype=torch.long)
    for row, p in enumerate(pad[:batch]):
        mask[row, :p] = 0
        ids[row, :p] = 0
    return ids, mask


def generate(model, ids, mask, new=NEW, **kw):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True, **kw)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return out.sequences[:, ids.shape[1]:], cache


@pytest.mark.parametrize("name, options", POLICIES)
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4)])
def test_keeping_everything_generates_what_dense_does(rng, name, options, heads, kv_heads):
    model = tiny_llama(heads, kv_heads)
    ids, mask = prompt(rng)
    dense, _ = generate(model, ids, mask)
    for settings in ({"ratio": 1.0, "interval": 1}, {"budget": N + NEW, "chunk": 7}):
        with attnzoo.compress(model, name, **settings, **options):
            tokens, cache = generate(model, ids, mask)
        assert torch.equal(tokens, dense), settings
        assert isinstance(cache.layers[0], CompressedLayer)


@pytest.mark.parametrize("name, options", POLICIES)
def test_budget_frees_memory_and_keeps_positions(rng, llama, name, options):
    ids, mask = prompt(rng)
    _, dense_cache = generate(llama, ids, mask)
    with attnzoo.compress(llama, name, budget=16, interval=4, **options):
        _, cache = generate(llama, ids, mask)
    for layer in cache.layers:
        assert 16 <= layer.keys.shape[2] < 16 + 4
        assert layer.get_seq_length() == N + NEW - 1  # positions continue those of the whole sequence
    assert cache_bytes(cache) < 0.75 * cache_bytes(dense_cache)


@pytest.mark.parametrize("name, options", POLICIES)
def test_padded_rows_generate_what_they_generate_alone(rng, llama, name, options):
    ids, mask = prompt(rng, pad=(0, 9))
    with attnzoo.compress(llama, name, budget=20, interval=3, **options):
        batched, _ = generate(llama, ids, mask)
        for row in range(2):
            real = mask[row].bool()
            alone, _ = generate(llama, ids[row:row + 1, real], mask[row:row + 1, real])
            assert torch.equal(batched[row:row + 1], alone), row


def planted_cache(rng, name, options, budget=12, n=40, spot=13):
    """A compressed layer after a prompt whose every query attends to the key at ``spot``."""
    policy = attnzoo.cache.get_policy(name, **options)
    budget_rule = compress_module.Budget(None, budget, policy.minimum_budget, None)
    layer = CompressedLayer(policy, budget_rule)
    direction = torch.randn(16, generator=rng)
    queries = direction + 0.1 * torch.randn(1, 4, n, 16, generator=rng)
    keys = 0.1 * torch.randn(1, 2, n, 16, generator=rng)
    keys[:, :, spot] = 3 * direction
    layer.update(keys, torch.randn(1, 2, n, 16, generator=rng))
    layer.observe(queries, None, 16 ** -0.5)
    return layer


@pytest.mark.parametrize("name, options", [("snapkv", {"window": 4}), ("h2o", {})])
def test_a_key_every_query_attends_survives(rng, name, options):
    layer = planted_cache(rng, name, options)
    assert layer.keys.shape[2] == 12
    assert (layer.positions == 13).any(dim=-1).all()  # on every head


def test_streaming_llm_drops_a_planted_key_outside_its_window(rng):
    layer = planted_cache(rng, "streaming_llm", {"sinks": 4})
    kept = layer.positions[0, 0].tolist()
    assert kept == [0, 1, 2, 3] + list(range(32, 40))


def test_chunked_prefill_bounds_the_cache(rng, llama, monkeypatch):
    ids, mask = prompt(rng, n=64)
    held = []
    observe = CompressedLayer.observe

    def recording(self, *args):
        held.append(self.stored())
        observe(self, *args)

    monkeypatch.setattr(CompressedLayer, "observe", recording)
    with attnzoo.compress(llama, "snapkv", budget=12, chunk=8, window=4):
        generate(llama, ids, mask, new=2)
    assert max(held) <= 12 + 8
    held.clear()
    with attnzoo.compress(llama, "snapkv", budget=12, window=4):
        generate(llama, ids, mask, new=2)
    assert max(held) == 64


def test_works_with_patch_in_either_order(rng, llama):
    ids, mask = prompt(rng, batch=1)
    with attnzoo.patch(llama, "sliding_window", window=16):
        patched, _ = generate(llama, ids, mask)
        with attnzoo.compress(llama, "snapkv", ratio=1.0, window=4):
            both, _ = generate(llama, ids, mask)
    assert torch.equal(both, patched)
    with attnzoo.compress(llama, "snapkv", budget=16, window=4):
        with attnzoo.patch(llama, "sliding_window", window=16):
            _, cache = generate(llama, ids, mask)
        assert cache.layers[0].keys.shape[2] < N  # still compressed after the inner unpatch
        _, cache = generate(llama, ids, mask)
        assert cache.layers[0].keys.shape[2] < N


def test_exit_restores_the_model(rng, llama):
    before = llama.config._attn_implementation
    with attnzoo.compress(llama, "h2o", ratio=0.5):
        pass
    assert llama.config._attn_implementation == before
    assert not any(hasattr(m, CAPTURE_ATTR) for m in llama.modules())


def test_per_layer_policies(rng, llama):
    ids, mask = prompt(rng)
    with attnzoo.compress(llama, layers={0: "streaming_llm", 1: ("snapkv", {"window": 4})}, budget=16):
        _, cache = generate(llama, ids, mask)
    assert [layer.policy.info.name for layer in cache.layers] == ["streaming_llm", "snapkv"]


@pytest.mark.parametrize("kwargs, argument", [
    ({"ratio": 0.0}, "ratio"), ({"ratio": 1.5}, "ratio"), ({}, "ratio, budget"), ({"ratio": 0.5, "budget": 8}, "ratio, budget"),
    ({"budget": 16}, "budget"),  # below snapkv's observation window of 32
    ({"budget": 64, "interval": 0}, "interval"), ({"budget": 64, "chunk": 0}, "chunk"),
])
def test_bad_arguments_name_themselves(llama, kwargs, argument):
    with pytest.raises(InvalidArgumentError) as e:
        attnzoo.compress(llama, "snapkv", **kwargs)
    assert e.value.argument == argument


def test_bad_layers_and_models(llama):
    with pytest.raises(InvalidArgumentError, match="layers"):
        attnzoo.compress(llama, layers={7: "h2o"}, ratio=0.5)
    with pytest.raises(UnsupportedError, match="no policy"):
        attnzoo.compress(llama, layers={0: "h2o"}, ratio=0.5)
    with pytest.raises(UnknownNameError):
        attnzoo.compress(llama, "snapkvv", ratio=0.5)
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                          num_attention_heads=4)).eval()
    with pytest.raises(UnsupportedError):
        attnzoo.compress(bert, "h2o", ratio=0.5)


def test_a_cache_passed_by_either_name_is_compressed(rng, llama):
    ids, _ = prompt(rng, batch=1)
    name = "cache" if "cache" in inspect.signature(llama.forward).parameters else "past_key_values"
    for argument in {name, "past_key_values"}:
        cache = transformers.DynamicCache(config=llama.config)
        with attnzoo.compress(llama, "streaming_llm", budget=8), torch.no_grad():
            llama(input_ids=ids, **{argument: cache}, use_cache=True)
        assert isinstance(cache.layers[0], CompressedLayer) and cache.layers[0].keys.shape[2] == 8
