"""attnzoo.integrations.transformers.capture: q, k, v and attention probabilities from tiny random-init models."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

import attnzoo
from attnzoo import InvalidArgumentError, UnsupportedError

transformers = pytest.importorskip("transformers")
from attnzoo.integrations.transformers import capture  # noqa: E402

T = transformers
VOCAB, N = 97, 20
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def tiny(family: str):
    torch.manual_seed(0)
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**TEXT, num_key_value_heads=2)).eval()
    return T.BertModel(T.BertConfig(**TEXT)).eval()


def padded(rng, family: str):
    """Two sequences, the second 6 tokens shorter: left padding for the decoder, right for the encoder."""
    ids = torch.randint(3, VOCAB, (2, N), generator=rng)
    mask = torch.ones(2, N, dtype=torch.long)
    if family == "llama":
        mask[1, :6] = 0
        return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    mask[1, N - 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", ["llama", "bert"])
@torch.no_grad()
def test_probabilities_of_the_model_equal_eager_attention_weights(family, rng):
    """transformers' eager attention returns its softmax weights: an independent reference."""
    model, x = tiny(family), padded(rng, family)
    model.set_attn_implementation("eager")
    weights = model(**x, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    before = model(**x)[0]
    with capture(model, probs=True) as cap:
        assert torch.equal(model(**x)[0], before)  # capturing changes nothing
    assert model.config._attn_implementation == "sdpa" and not any(hasattr(m, "_attnzoo_capture") for m in model.modules())
    valid = x["attention_mask"].bool()
    for layer in (0, 1):
        record = cap.first(layer)
        assert len(cap.records[layer]) == 1 and record.plan is None and record.causal == (family == "llama")
        assert record.q.shape == (2, 4, N, 16) and record.k.shape == (2, 2 if family == "llama" else 4, N, 16)
        assert record.mask is not None and record.mask.dtype == torch.bool
        for b in range(2):
            assert rel_err(record.probs[b][:, valid[b]], weights[layer][b][:, valid[b]]) <= 1e-5, (family, layer, b, rng.initial_seed())
        assert bool((record.probs[1][..., ~valid[1]] == 0).all())  # padded keys get nothing


@torch.no_grad()
def test_probabilities_of_a_patched_layer_are_the_methods(rng):
    model = tiny("llama")
    x = {"input_ids": torch.randint(3, VOCAB, (1, N), generator=rng)}
    with capture(model, [0], probs=True) as exact:
        model(**x)
    with attnzoo.patch(model, "streaming", window=4, sinks=1, heads=[0, 1]):
        with capture(model, [0], probs=True) as cap:
            model(**x)
        assert model.config._attn_implementation == "attnzoo"  # the user's patch stays
    record = cap.first(0)
    assert record.plan == [{"heads": [0, 1], "method": repr(attnzoo.get_method("streaming", window=4, sinks=1))}]
    assert torch.equal(record.q, exact.first(0).q)  # layer 0 sees the same inputs either way
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    streaming = (j <= i) & ((j < 1) | (i - j < 4))
    k = record.k.repeat_interleave(2, dim=1)
    scores = (record.q @ k.transpose(-1, -2)) * 16 ** -0.5
    for h in range(4):
        allowed = streaming if h < 2 else j <= i
        expected = torch.softmax(scores[0, h].masked_fill(~allowed, float("-inf")), dim=-1)
        assert rel_err(record.probs[0, h], expected) <= 1e-5, (h, rng.initial_seed())
    assert rel_err(exact.first(0).probs[0, 2:], record.probs[0, 2:]) <= 1e-6


def test_methods_without_a_support_have_no_probabilities(rng):
    model = tiny("llama")
    x = {"input_ids": torch.randint(3, VOCAB, (1, N), generator=rng)}
    with attnzoo.patch(model, "linear"), torch.no_grad():
        with capture(model, [1]) as cap:
            model(**x)
        assert cap.first(1).probs is None and cap.first(1).q.shape == (1, 4, N, 16)
        with capture(model, [1], qkv=False, probs=True), pytest.raises(UnsupportedError, match="'linear' has no sparse support"):
            model(**x)
    assert model.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_decode_steps_are_recorded_on_request(rng):
    model = tiny("llama")
    x = torch.randint(3, VOCAB, (1, 8), generator=rng)
    options = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(x)}
    with capture(model, [1]) as prefill:
        model.generate(x, **options)
    with capture(model, [1], prefill_only=False, device=None) as every:
        model.generate(x, **options)
    assert [r.q.shape[2] for r in prefill.records[1]] == [8]
    assert [(r.q.shape[2], r.k.shape[2]) for r in every.records[1]] == [(8, 8), (1, 9), (1, 10)]


def test_capture_errors():
    model = tiny("llama")
    with pytest.raises(InvalidArgumentError, match="qkv, probs"):
        capture(model, qkv=False)
    with pytest.raises(InvalidArgumentError, match=r"layers: expected a layer index in \[0, 1\]"):
        capture(model, [2])
    with capture(model):
        with pytest.raises(InvalidArgumentError, match="without an open capture"):
            capture(model)
    assert model.config._attn_implementation == "sdpa"
