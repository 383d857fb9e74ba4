"""EchoAtt's shared attention maps: the plans' hand-over on planted inputs, inside a tiny model
(prefill, decode, padding, capture), the layer search and bad configs."""

from __future__ import annotations

import pytest
import torch
from fidelity.mutation import Mutant, assert_caught
from helpers import qkv

import attnzoo
from attnzoo import InvalidArgumentError, UnsupportedError

pytest.importorskip("transformers")
from integrations.test_transformers import tiny_llama  # noqa: E402

from attnzoo.integrations.transformers import echo as echo_module  # noqa: E402
from attnzoo.integrations.transformers.compress import cache_argument  # noqa: E402
from attnzoo.integrations.transformers.echo import echo_plans, roots  # noqa: E402
from attnzoo.integrations.transformers.plan import AttentionLayer  # noqa: E402

FORMAT = "attnzoo-echo/1"


def layers(n=3, heads=4, kv_heads=2):
    return [AttentionLayer(i, torch.nn.Identity(), True, heads, kv_heads, 16) for i in range(n)]


def config(share):
    return {"format": FORMAT, "share": share}


def softmax_attention(q, k, v, causal):
    """softmax(q k^T / sqrt(D)) v written out, GQA by repeating k and v."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        logits = logits.masked_fill(torch.ones(logits.shape[-2:], dtype=torch.bool).triu(1 + k.shape[2] - q.shape[2]), float("-inf"))
    return logits.softmax(-1) @ v


def test_echo_with_the_source_q_k_is_attention_over_its_own_values(rng):
    """Identical q, k in source and echo layer: the echo layer's output is its exact attention;
    other q, k in the echo layer are ignored (its output stays the source's map times its values)."""
    plans = echo_plans(layers(), config({2: 1}))
    assert set(plans) == {1, 2}
    q, k, v1 = qkv(rng, B=2, Hq=4, Hkv=2, Nq=20, D=16)
    v2 = torch.randn_like(v1)
    plans[1](q, k, v1, None, True, 0.25)
    expected = softmax_attention(q, k, v2, True)
    torch.testing.assert_close(plans[2](q, k, v2, None, True, 0.25), expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(plans[2](torch.randn_like(q), torch.randn_like(k), v2, None, True, 0.25), expected, atol=2e-5, rtol=1e-4)


def test_known_answer_one_hot_source_map_copies_own_values(rng):
    """A source whose queries each attend only to their own key (q_i = k_i = 40 e_i): every echo
    layer's token i outputs its own value v_i, whatever its own q and k; a decode step (one
    query over the cache) likewise reads the value of the key its source picked."""
    check_one_hot_source(rng)


def check_one_hot_source(rng) -> None:
    n = 12
    basis = 40.0 * torch.eye(16)[:n]
    q_src = basis[None, None].expand(1, 2, n, 16).contiguous()
    plans = echo_plans(layers(4, heads=2, kv_heads=2), config({"2": 1, "3": 2}))  # 3 echoes 2, which echoes 1
    assert plans[3].source == 1
    plans[1](q_src, q_src, torch.randn(1, 2, n, 16, generator=rng), None, True, 0.25)
    own_q, own_k, own_v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=n, D=16)
    for layer in (2, 3):
        torch.testing.assert_close(plans[layer](own_q, own_k, own_v, None, True, 0.25), own_v)
    step = q_src[:, :, 4:5]  # the decode query of the source picks key 4
    plans[1](step, q_src, torch.randn(1, 2, n, 16, generator=rng), None, True, 0.25)
    torch.testing.assert_close(plans[3](own_q[:, :, :1], own_k, own_v, None, True, 0.25), own_v[:, :, 4:5])


def _own_q_k(self, source, layer, q, k):
    """The echo layer's own q, k stand in for the source's (no map shared at all)."""
    return q, k


_echo_call = echo_module.EchoPlan.__call__


def _source_values(self, q, k, v, mask, causal, scale, window=None):
    """The source's map over the source's keys read as values (the echo layer's values ignored)."""
    qs, ks = self.maps.get(self.source, self.layer, q, k)
    return _echo_call(self, q, k, ks.clone(), mask, causal, scale, window)


MUTANTS = [
    Mutant("echo-own-q-k", echo_module.SharedMaps, "get", _own_q_k),
    Mutant("echo-source-values", echo_module.EchoPlan, "__call__", _source_values),
]


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_is_caught(mutant, monkeypatch):
    seed = 20261201
    print(f"seed {seed}")
    assert_caught(monkeypatch, mutant, lambda: check_one_hot_source(torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("share, match", [
    ({0: 0}, r"share\[0\]: expected a source layer before layer 0"),
    ({1: 2}, r"share\[1\]: expected a source layer before layer 1"),
    ({5: 1}, r"config.share: expected a layer index in \[0, 2\]"),
    ({2: 7}, r"config.share\[2\]: expected a layer index"),
    ({}, "at least one"),
])
def test_bad_share(share, match):
    with pytest.raises(InvalidArgumentError, match=match):
        echo_plans(layers(), config(share))


def test_bad_config_and_unrun_source(rng):
    with pytest.raises(InvalidArgumentError, match="attnzoo-echo/1"):
        echo_plans(layers(), {"format": "attnzoo-patterns/1", "layers": {}})
    windowed = [AttentionLayer(i, torch.nn.Identity(), True, 4, 2, 16, window=8 if i == 1 else None) for i in range(3)]
    with pytest.raises(UnsupportedError, match="sliding window"):
        echo_plans(windowed, config({2: 1}))
    plans = echo_plans(layers(), config({2: 0}))
    q, k, v = qkv(rng, B=1, Hq=4, Hkv=2, Nq=8, D=16)
    with pytest.raises(UnsupportedError, match="has not run"):
        plans[2](q, k, v, None, True, 0.25)
    plans[0](q, k, v, None, True, 0.25)
    with pytest.raises(UnsupportedError, match="does not match"):
        plans[2](q[:, :, :4], k[:, :, :4], v[:, :, :4], None, True, 0.25)


def test_chains_resolve_to_the_first_source():
    assert roots({2: 1, 3: 2, 5: 4}) == {2: 1, 3: 1, 5: 4}


# ---- inside a tiny model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return tiny_llama(layers=3)


@torch.no_grad()
def test_in_a_model_prefill_decode_padding_and_capture(llama, rng):
    ids = torch.randint(1, 97, (1, 24), generator=rng)
    plain = llama(ids).logits
    with attnzoo.patch(llama, "echo", config=config({2: 1})) as model:
        full = model(ids).logits
        assert (full - plain).abs().max() > 1e-3  # layer 2 now attends with layer 1's maps
        # a decode step over the prefilled cache gives the full forward's last logits
        prefill = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], **{cache_argument(model): prefill.past_key_values}, use_cache=True).logits
        torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-4, rtol=1e-4)
        # left padding: the padded row computes what it computes alone
        padded = torch.cat([torch.zeros(1, 5, dtype=ids.dtype), ids[:, :19]], dim=1)
        batch = torch.cat([ids, padded])
        mask = torch.ones_like(batch)
        mask[1, :5] = 0
        both = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(both[1, 5:], model(ids[:, :19]).logits[0], atol=1e-4, rtol=1e-4)
        recording = attnzoo.analysis.record(model, ids)
    torch.testing.assert_close(recording.probs[2], recording.probs[1])


@torch.no_grad()
def test_search(llama, rng):
    from attnzoo.integrations.transformers.echo import echo_search

    ids = torch.randint(1, 97, (1, 24), generator=rng)
    similarity = attnzoo.analysis.layer_similarity(attnzoo.analysis.record(llama, ids).probs)
    found = echo_search(llama, ids, 1)
    best = max((1, 2), key=lambda layer: float(similarity[layer, layer - 1]))
    assert found["share"] == {str(best): best - 1}
    assert found["similarity"][str(best)] == pytest.approx(float(similarity[best, best - 1]))
    both = echo_search(llama, ids, 2)
    assert both["share"] == {"1": 0, "2": 0}  # layer 2 echoes layer 1, which echoes layer 0
    with pytest.raises(InvalidArgumentError, match="shared"):
        echo_search(llama, ids, 3)
    with attnzoo.patch(llama, "echo", config=both) as model:
        assert model(ids).logits.shape == (1, 24, 97)
