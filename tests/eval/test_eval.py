"""attnzoo.eval on random tensors and tiny random-init models (fast); real models in test_real_models.py."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from helpers import qkv, rel_err

import attnzoo
from attnzoo import InvalidArgumentError
from attnzoo.eval import CapturedQKV, approximation, attention_recall, english_text, passkey_prompt, perplexity
from attnzoo.eval.cli import parse_settings
from attnzoo.kernels.dense import causal_mask
from attnzoo.method import Call, MethodInfo

transformers = pytest.importorskip("transformers")


class CharTokenizer:
    """Byte-level stand-in for a tokenizer: one id per UTF-8 byte."""

    pad_token_id = eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = list(text.encode("utf-8"))
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def tiny_lm():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(config).eval()


def brute_force_recall(q, k, support, causal, scale):
    probs = torch.softmax(attnzoo.kernels.dense.attention_scores(q.double(), k.double(), scale=scale)
                          .masked_fill(~causal_mask(q.shape[2], k.shape[2]) if causal else torch.zeros((), dtype=torch.bool), float("-inf")), -1)
    return (probs * support).sum(-1).mean(dim=(0, 2))


def test_english_text_is_real_prose():
    text = english_text()
    assert len(text) > 200_000
    assert "statement" in text and text.count(" the ") > 1000


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_attention_recall_matches_brute_force(rng, causal, chunk):
    q, k, _ = qkv(rng, B=2, Hq=4, Hkv=2, Nq=50, D=8)
    support = torch.rand(2, 4, 50, 50, generator=rng) < 0.3
    got = attention_recall(q, k, support, causal=causal, scale=0.3, chunk=chunk)
    assert torch.allclose(got, brute_force_recall(q, k, support, causal, 0.3), atol=1e-12)
    full = attention_recall(q, k, torch.ones(1, 1, 1, 1, dtype=torch.bool), causal=causal, scale=0.3, chunk=chunk)
    assert torch.allclose(full, torch.ones(4, dtype=torch.float64))


def captured(rng, layers=(0, 3), N=64):
    out = {}
    for i in layers:
        q, k, v = qkv(rng, B=1, Hq=6, Hkv=2, Nq=N, D=16)
        out[i] = CapturedQKV(i, q, k, v, True, 0.25)
    return out


def test_approximation_reports_error_and_recall(rng):
    data = captured(rng)
    exact = approximation("dense", data, show_progress=False)
    assert exact.mean_rel_error == 0 and exact.mean_recall == pytest.approx(1.0)
    seen = []
    local = approximation("streaming", data, window=8, sinks=2, show_progress=False, on_layer=lambda r: seen.append(len(r.layers)))
    assert seen == [1, 2]
    method = attnzoo.get_method("streaming", window=8, sinks=2)
    for row in local.layers:
        c = data[row.layer]
        assert row.rel_error == pytest.approx(rel_err(method(c.q, c.k, c.v, causal=True, scale=0.25),
                                                      attnzoo.attention(c.q, c.k, c.v, causal=True, scale=0.25)), rel=1e-6)
        support = method.support(c.q, c.k, c.v, causal=True, scale=0.25)
        assert row.recall_per_head == pytest.approx(brute_force_recall(c.q, c.k, support, True, 0.25).tolist(), abs=1e-12)
        assert 0 < row.recall < 1 and row.rel_error > 1e-3
    json.dumps(local.as_dict())


def test_approximation_bound_is_the_best_support_of_the_methods_density(rng):
    data = captured(rng)
    result = approximation("streaming", data, window=8, sinks=2, bound=True, show_progress=False)
    method = attnzoo.get_method("streaming", window=8, sinks=2)
    for row in result.layers:
        c = data[row.layer]
        _, stats = method(c.q, c.k, c.v, causal=True, scale=0.25, return_stats=True)
        assert row.density == pytest.approx(stats.density)
        want = attnzoo.eval.oracle_recall(c.q, c.k, causal=True, scale=0.25, density=row.density)
        assert row.bound == pytest.approx(float(want.mean())) and row.bound >= row.recall - 1e-9
    assert result.as_dict()["mean_bound"] == pytest.approx(sum(r.bound for r in result.layers) / len(result.layers))
    assert approximation("streaming", data, window=8, sinks=2, show_progress=False).mean_bound is None


def test_recall_is_not_applicable_without_sparse_support(rng):
    class Pooled(attnzoo.Method):
        info = MethodInfo(name="pooled_test", title="test", arxiv=None, family=("linear",), causal=True, non_causal=True,
                          cross=True, gqa=True, training_free=True, time="O(N)", memory="O(N)")

        @dataclass
        class Config:
            pass

        def _forward(self, q, k, v, call: Call):
            return attnzoo.attention(q, k, v, causal=call.causal, scale=call.scale)

    result = approximation(Pooled(), captured(rng, layers=(1,)), show_progress=False)
    assert result.layers[0].recall is None and result.mean_recall is None


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_places_the_key_at_its_depth(depth):
    tok = CharTokenizer()
    ids, position = passkey_prompt(tok, 3000, depth, "12345")
    text = tok.decode(ids[0])
    assert abs(ids.shape[1] - 3000) <= 100
    assert text[position:].startswith("The pass key is 12345.")
    assert text.endswith("The pass key is")
    filler = text.count("The grass is green")
    assert text[:position].count("The grass is green") == round(depth * filler)


def test_perplexity_equals_the_models_own_loss():
    model, tok = tiny_lm(), CharTokenizer()
    text = english_text()[:5000]
    result = perplexity(model, tok, text, context_len=300, windows=2, show_progress=False)
    ids = torch.tensor(tok(text)["input_ids"])
    with torch.no_grad():
        losses = [float(model(input_ids=ids[None, w * 300:(w + 1) * 300], labels=ids[None, w * 300:(w + 1) * 300]).loss) for w in range(2)]
    assert result.nll == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.nll)) and result.tokens == 598
    json.dumps(result.as_dict())
    with pytest.raises(InvalidArgumentError, match="context_len"):
        perplexity(model, tok, text, context_len=6000, show_progress=False)


def test_perplexity_and_passkey_need_a_language_model():
    encoder = transformers.BertModel(transformers.BertConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(InvalidArgumentError, match="causal language model"):
        perplexity(encoder, CharTokenizer(), "text " * 100, context_len=64)
    with pytest.raises(InvalidArgumentError, match="causal language model"):
        attnzoo.eval.passkey(encoder, CharTokenizer(), 512)


def test_capture_qkv_on_a_tiny_model_feeds_approximation():
    model, tok = tiny_lm(), CharTokenizer()
    data = attnzoo.eval.capture_qkv(model, tok, english_text()[:2000], layers=[1], max_tokens=200)
    c = data[1]
    assert c.q.shape == (1, 4, 200, 8) and c.k.shape == (1, 2, 200, 8) and c.causal and c.scale == pytest.approx(8 ** -0.5)
    assert approximation("dense", data, show_progress=False).mean_rel_error <= 1e-6
    with pytest.raises(InvalidArgumentError, match="layer index in \\[0, 1\\]"):
        attnzoo.eval.capture_qkv(model, tok, english_text()[:2000], layers=[2], max_tokens=50)
    assert model.config._attn_implementation == "sdpa"


def test_parse_settings():
    assert parse_settings(["window=1024", "spans=[1, 2]", "name=abc"]) == {"window": 1024, "spans": [1, 2], "name": "abc"}
    with pytest.raises(InvalidArgumentError, match="--set"):
        parse_settings(["window"])
