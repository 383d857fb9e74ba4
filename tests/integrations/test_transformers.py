"""attnzoo.patch on tiny random-init transformers models built from configs (no weights, fast)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import qkv, rel_err

import attnzoo
from attnzoo import InvalidArgumentError, UnsupportedError

transformers = pytest.importorskip("transformers")
from attnzoo.integrations.transformers import HeadGroup, LayerPlan  # noqa: E402

VOCAB, N = 97, 48


def tiny_llama(layers=2, heads=4, kv_heads=2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128)
    return transformers.BertModel(config).eval()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def bert():
    return tiny_bert()


def ids(rng, batch=2, n=N):
    return torch.randint(0, VOCAB, (batch, n), generator=rng)


def window_mask(n, window, heads=1):
    """(1, heads, n, n) causal sliding-window mask, True = attend."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return ((j <= i) & (i - j < window))[None, None].expand(1, heads, n, n)


@torch.no_grad()
def logits(model, x, **kw):
    return model(input_ids=x, **kw).logits


# ---- round trip ------------------------------------------------------------------------------
@torch.no_grad()
def test_dense_patch_matches_unpatched_and_unpatch_restores(llama, rng):
    x = ids(rng)
    before = logits(llama, x)
    handle = attnzoo.patch(llama, "dense")
    assert llama.config._attn_implementation == "attnzoo"
    assert rel_err(logits(llama, x), before) <= 1e-6
    assert attnzoo.unpatch(llama) and not attnzoo.unpatch(llama)
    assert llama.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_attnzoo_plan") for m in llama.modules())
    assert torch.equal(logits(llama, x), before)
    assert "Patch" in repr(handle)


@torch.no_grad()
def test_sliding_window_equals_unpatched_model_with_the_same_mask(llama, rng):
    """The method really runs inside every layer, GQA included: same logits as the unpatched model
    given the window as an explicit 4-D mask."""
    x = ids(rng, batch=1)
    expected = logits(llama, x, attention_mask=window_mask(N, 8))
    with attnzoo.patch(llama, "sliding_window", window=8) as patched:
        got = logits(patched, x)
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(got, logits(llama, x)) > 1e-3


@torch.no_grad()
def test_context_manager_unpatches_on_error(llama, rng):
    x = ids(rng)
    before = logits(llama, x)
    with pytest.raises(RuntimeError, match="boom"):
        with attnzoo.patch(llama, "streaming", window=4):
            raise RuntimeError("boom")
    assert llama.config._attn_implementation == "sdpa"
    assert torch.equal(logits(llama, x), before)


@torch.no_grad()
def test_repatching_replaces_the_previous_patch(llama, rng):
    x = ids(rng, batch=1)
    expected = logits(llama, x, attention_mask=window_mask(N, 12))
    attnzoo.patch(llama, "sliding_window", window=8)
    attnzoo.patch(llama, "sliding_window", window=12)
    try:
        assert rel_err(logits(llama, x), expected) <= 1e-5
    finally:
        assert attnzoo.unpatch(llama)
    assert llama.config._attn_implementation == "sdpa"


# ---- per-layer and per-head settings -----------------------------------------------------------
@torch.no_grad()
def test_layer_forms_agree(rng):
    model = tiny_llama(layers=3)
    x = ids(rng)
    spec = ("sliding_window", {"window": 6})
    outs = []
    for kwargs in ({"method": "sliding_window", "layers": [1], "window": 6},
                   {"layers": {1: spec}},
                   {"method": {1: spec, 2: None}},
                   {"layers": lambda i: attnzoo.get_method("sliding_window", window=6) if i == 1 else None}):
        method = kwargs.pop("method", None)
        with attnzoo.patch(model, method, **kwargs) as patched:
            outs.append(logits(patched, x))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    with attnzoo.patch(model, "sliding_window", window=6):
        everywhere = logits(model, x)
    assert rel_err(outs[0], logits(model, x)) > 1e-4 and rel_err(outs[0], everywhere) > 1e-4


@pytest.mark.parametrize("heads", [(0, 1), (1, 2), (3,), (0, 2, 3)])
def test_head_subset_runs_method_on_those_heads_and_exact_elsewhere(rng, heads):
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=40, D=16)
    method = attnzoo.get_method("streaming", window=6, sinks=2)
    out = LayerPlan([HeadGroup(heads, method)], decode=True)(q, k, v, None, True, 0.25)
    dense = attnzoo.get_method("dense")
    for h in range(4):
        m = method if h in heads else dense
        expected = m.reference(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1], causal=True, scale=0.25)
        assert rel_err(out[:, h:h + 1], expected) <= 1e-5, (h, rng.initial_seed())


@torch.no_grad()
def test_heads_argument_in_a_model(llama, rng):
    x = ids(rng, batch=1)
    with attnzoo.patch(llama, "sliding_window", window=8, heads=range(4)):  # all heads: same as no restriction
        all_heads = logits(llama, x)
    assert rel_err(all_heads, logits(llama, x, attention_mask=window_mask(N, 8))) <= 1e-5
    with attnzoo.patch(llama, "sliding_window", window=8, heads=[1, 2]) as patched:
        some = logits(patched, x)
    per_head = torch.cat([torch.ones(1, 1, N, N, dtype=torch.bool).tril(), window_mask(N, 8, 2), torch.ones(1, 1, N, N, dtype=torch.bool).tril()], 1)
    assert rel_err(some, logits(llama, x, attention_mask=per_head)) <= 1e-5


# ---- "auto": per layer, per head specs ----------------------------------------------------------
@torch.no_grad()
def test_auto_patterns_match_per_head_masks(llama, rng, tmp_path):
    x = ids(rng, batch=1)
    heads = [{"method": "sliding_window", "config": {"window": 8}}, {"method": "dense"},
             {"method": "streaming", "config": {"sinks": 2, "window": 5}}, {"method": "sliding_window", "config": {"window": 8}}]
    patterns = {"format": "attnzoo-patterns/1", "layers": {"0": heads, "1": heads}}
    path = tmp_path / "patterns.json"
    path.write_text(json.dumps(patterns))
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    causal = j <= i
    streaming = causal & ((j < 2) | (i - j < 5))
    masks = torch.stack([causal & (i - j < 8), causal, streaming, causal & (i - j < 8)])[None]
    expected = logits(llama, x, attention_mask=masks)
    for source in (patterns, str(path)):
        handle = attnzoo.patch(llama, "auto", config=source)
        try:
            groups = handle.describe()[0]
            assert sorted(g["heads"] for g in groups) == [[0, 3], [1], [2]]
            assert rel_err(logits(llama, x), expected) <= 1e-5
        finally:
            attnzoo.unpatch(llama)


@torch.no_grad()
def test_auto_leaves_unlisted_layers_exact(llama, rng):
    x = ids(rng, batch=1)
    expected = logits(llama, x)
    patterns = {"format": "attnzoo-patterns/1", "layers": {"1": [{"method": "streaming", "config": {"window": 6}}] * 4}}
    with attnzoo.patch(llama, "auto", config=patterns) as patched:
        got = logits(patched, x)
    with attnzoo.patch(llama, "streaming", window=6, layers=[1]) as patched:
        assert torch.equal(logits(patched, x), got)
    assert rel_err(got, expected) > 1e-4


@pytest.mark.parametrize("patterns,match", [
    ({"format": "other", "layers": {}}, "attnzoo-patterns/1"),
    ({"format": "attnzoo-patterns/1", "layers": {"0": [{"method": "dense"}] * 3}}, "4 method specs"),
    ({"format": "attnzoo-patterns/1", "layers": {"7": [{"method": "dense"}] * 4}}, "layer index in \\[0, 1\\]"),
    ({"format": "attnzoo-patterns/1", "layers": {"0": [{"config": {}}] * 4}}, "method"),
])
def test_auto_rejects_bad_pattern_files(llama, patterns, match):
    with pytest.raises(InvalidArgumentError, match=match):
        attnzoo.patch(llama, "auto", config=patterns)
    assert llama.config._attn_implementation == "sdpa"


# ---- padding ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,config", [("dense", {}), ("sliding_window", {"window": 8}), ("streaming", {"window": 6, "sinks": 2})])
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padded_batch_equals_each_sequence_alone(llama, rng, method, config, side):
    x = ids(rng, batch=2)
    lengths = [N, N - 11]
    mask = torch.zeros(2, N, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, N - n:] = 1
        else:
            mask[b, :n] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with attnzoo.patch(llama, method, **config) as patched:
        batched = logits(patched, x, attention_mask=mask, position_ids=positions)
        for b in range(2):
            keep = mask[b].bool()
            alone = logits(patched, x[b:b + 1, keep])
            assert rel_err(batched[b, keep], alone[0]) <= 1e-5, (method, side, b)


@torch.no_grad()
def test_padded_batch_on_bert(bert, rng):
    x = ids(rng, batch=2, n=30)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 19:] = 0
    reference = bert(input_ids=x, attention_mask=mask).last_hidden_state
    with attnzoo.patch(bert, "dense"):
        dense = bert(input_ids=x, attention_mask=mask).last_hidden_state
    assert rel_err(dense[0], reference[0]) <= 1e-5 and rel_err(dense[1, :19], reference[1, :19]) <= 1e-5
    with attnzoo.patch(bert, "sliding_window", window=5):
        batched = bert(input_ids=x, attention_mask=mask).last_hidden_state
        alone = bert(input_ids=x[1:, :19]).last_hidden_state
    assert rel_err(batched[1, :19], alone[0]) <= 1e-5
    assert rel_err(batched[1, :19], reference[1, :19]) > 1e-3


@torch.no_grad()
def test_masks_that_are_not_padding_are_refused(llama, rng):
    x = ids(rng, batch=1)
    with attnzoo.patch(llama, "sliding_window", window=8):
        with pytest.raises(UnsupportedError, match="only padding is supported"):
            logits(llama, x, attention_mask=window_mask(N, 4))


# ---- decoding ---------------------------------------------------------------------------------
def test_decode_steps_use_exact_attention_unless_the_method_runs_them(rng):
    q, k, v = qkv(rng, B=1, Hq=4, Hkv=2, Nq=1, Nk=40)
    method = attnzoo.get_method("streaming", window=4, sinks=1)
    assert LayerPlan([HeadGroup(None, method)], decode=False)(q, k, v, None, True, 0.25) is None
    out = LayerPlan([HeadGroup(None, method)], decode=True)(q, k, v, None, True, 0.25)
    assert rel_err(out, method.reference(q, k, v, causal=True, scale=0.25)) <= 1e-5


@torch.no_grad()
def test_generation_through_a_patch(llama, rng):
    x = ids(rng, batch=1, n=20)
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(x)}
    plain = llama.generate(x, **options)
    with attnzoo.patch(llama, "dense"):
        assert torch.equal(llama.generate(x, **options), plain)
    # a window wider than the whole generation is exact attention, at prefill and at every decode step
    with attnzoo.patch(llama, "streaming", window=64, sinks=1, decode="method"):
        assert torch.equal(llama.generate(x, **options), plain)
    handle = attnzoo.patch(llama, "streaming", window=3, sinks=0, decode="exact")
    with handle:
        assert not handle.plans[0].decode
        llama.generate(x, **options)


def test_auto_decode_runs_patterns_and_decodes_prefill_methods_exactly(llama):
    """A position pattern keeps its window while generating; a content-selected prefill method
    (MInference's vertical-slash) decodes with exact attention."""
    for method, decodes in (("streaming", True), ("vertical_slash", False)):
        handle = attnzoo.patch(llama, method)
        with handle:
            assert all(plan.decode == decodes for plan in handle.plans.values())


# ---- errors -----------------------------------------------------------------------------------
def test_errors_at_patch_time(llama, bert):
    with pytest.raises(InvalidArgumentError, match=r"layers: expected a layer index in \[0, 1\].*got 2"):
        attnzoo.patch(llama, "dense", layers=[2])
    with pytest.raises(InvalidArgumentError, match=r"layers\[-1\]"):
        attnzoo.patch(llama, layers={-1: "dense"})
    with pytest.raises(InvalidArgumentError, match=r"heads: expected query-head indices in \[0, 3\]"):
        attnzoo.patch(llama, "dense", heads=[4])
    with pytest.raises(UnsupportedError, match="'hilo' cannot run causal attention"):
        attnzoo.patch(llama, "hilo")
    with pytest.raises(UnsupportedError, match="'streaming' is causal only"):
        attnzoo.patch(bert, "streaming")
    with pytest.raises(attnzoo.UnknownNameError, match="did you mean 'streaming'"):
        attnzoo.patch(llama, "streamin")
    with pytest.raises(attnzoo.UnknownNameError, match="option of method 'sliding_window'"):
        attnzoo.patch(llama, "sliding_window", windw=4)
    with pytest.raises(InvalidArgumentError, match="model: expected a Hugging Face transformers PreTrainedModel"):
        attnzoo.patch(torch.nn.Linear(2, 2), "dense")
    with pytest.raises(InvalidArgumentError, match="decode"):
        attnzoo.patch(llama, "dense", decode="sometimes")
    with pytest.raises(InvalidArgumentError, match="config"):
        attnzoo.patch(llama, "auto")
    assert llama.config._attn_implementation == "sdpa" and bert.config._attn_implementation == "sdpa"


def test_model_whose_attention_skips_the_interface_is_refused():
    """Bloom writes its attention inline (no ALL_ATTENTION_FUNCTIONS lookup): nothing to route through attnzoo."""
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2)
    model = transformers.BloomForCausalLM(config)
    with pytest.raises(UnsupportedError, match="BloomForCausalLM \\(model_type 'bloom'\\) has no attention module that calls transformers' attention interface"):
        attnzoo.patch(model, "dense")


def test_dropout_during_training_is_refused(rng):
    model = tiny_bert().train()
    with attnzoo.patch(model, "dense"):
        with pytest.raises(UnsupportedError, match="dropout"):
            model(input_ids=ids(rng, n=8))


def test_import_attnzoo_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import attnzoo\n"
            "assert attnzoo.list_methods()\n"
            "try:\n    attnzoo.patch(object(), 'dense')\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install" in out and "transformers" in out


@torch.no_grad()
def test_roberta_round_trip(rng):
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=80)
    model = transformers.RobertaModel(config).eval()
    x = ids(rng, batch=1, n=30).clamp(min=3)
    reference = model(input_ids=x).last_hidden_state
    with attnzoo.patch(model, "dense"):
        assert rel_err(model(input_ids=x).last_hidden_state, reference) <= 1e-6
    with attnzoo.patch(model, "sliding_window", window=5):
        assert rel_err(model(input_ids=x).last_hidden_state, reference) > 1e-3
    assert torch.equal(model(input_ids=x).last_hidden_state, reference)
