"""The linear family beyond the contract suite (tests/contract): family membership, degenerate
settings that are exact attention, the performer's error against its feature count, and the fits of
the learned parts."""

from __future__ import annotations

import pytest
import torch
from helpers import qkv, rel_err

import attnzoo
from attnzoo.errors import UnknownNameError

# learned feature maps hold parameters, so their outputs require grad when rel_err reads them
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")

NAMES = ("linear", "performer", "random_feature", "hedgehog", "lightning", "transnormer", "rala", "inline", "agent",
         "linfusion", "scatterbrain", "sea")


def small(q, k, v, factor=0.5):
    """Softmax-estimating methods are compared on moderate logits."""
    return q * factor, k * factor, v


def test_every_method_is_registered_in_the_linear_family():
    infos = {i.name: i for i in attnzoo.list_methods("linear")}
    assert set(NAMES) <= set(infos)
    assert "learned" in infos["hedgehog"].family and "learned" in infos["linfusion"].family
    assert "dynamic" in infos["sea"].family
    for name in NAMES:
        assert infos[name].arxiv and infos[name].title


EXACT = [
    ("scatterbrain", dict(num_buckets=1, bucket_chunk=128), (True, False)),
    ("random_feature", dict(num_heads=1, mean=1.0, std=0.0, activation="softmax"), (True, False)),
    ("sea", dict(top_k=200, q_block=16), (True, False)),
    ("transnormer", dict(mode="diag", block_size=128), (True, False)),
]


@pytest.mark.parametrize("name,cfg,causals", EXACT, ids=[e[0] for e in EXACT])
def test_degenerate_settings_equal_dense(name, cfg, causals, rng):
    m = attnzoo.get_method(name, **cfg)
    q, k, v = qkv(rng, Nq=100)
    for causal in causals:
        assert rel_err(m(q, k, v, causal=causal), attnzoo.attention(q, k, v, "dense", causal=causal)) <= 1e-4


def test_performer_error_falls_with_more_features(rng):
    q, k, v = small(*qkv(rng, B=1, Hq=2, Hkv=2, Nq=200, D=16), factor=0.4)
    dense = attnzoo.attention(q, k, v, "dense", causal=True)
    errs = [rel_err(attnzoo.attention(q, k, v, "performer", causal=True, num_features=m, seed=1), dense) for m in (8, 2048)]
    assert errs[1] < 0.5 * errs[0], errs


def _structured_qk(gen, centers, n=128):
    """Queries/keys near a few shared centers (heads, 4, dim), so softmax attention is peaked."""
    heads, _, dim = centers.shape
    pick = lambda: centers.gather(1, torch.randint(0, 4, (heads, n, 1), generator=gen).expand(-1, -1, dim))  # noqa: E731
    q = (pick() + 0.3 * torch.randn(heads, n, dim, generator=gen)).unsqueeze(0)
    k = (pick() + 0.3 * torch.randn(heads, n, dim, generator=gen)).unsqueeze(0)
    return q, k, torch.randn(1, heads, n, dim, generator=gen)


@pytest.mark.parametrize("name,causal", [("hedgehog", True), ("linfusion", False)])
def test_fit_lowers_error_on_held_out_inputs(name, causal, rng):
    centers = torch.randn(2, 4, 8, generator=rng) * 1.5
    train, test = _structured_qk(rng, centers), _structured_qk(rng, centers)
    m = attnzoo.get_method(name)
    dense = attnzoo.attention(*test, "dense", causal=causal)
    with torch.no_grad():
        before = rel_err(m(*test, causal=causal), dense)
    losses = m.fit(train[0], train[1], causal=causal, steps=100, lr=2e-2)
    with torch.no_grad():
        after = rel_err(m(*test, causal=causal), dense)
    assert losses[-1] < losses[0] and after < before, (before, after, rng.initial_seed())
    assert isinstance(m.feature_map, torch.nn.Module) and not hasattr(m.config, "feature_map")


def test_random_feature_value_fit_lowers_error(rng):
    q, k, v = small(*qkv(rng, B=1, Hq=2, Hkv=2, Nq=64, D=8))
    m = attnzoo.get_method("random_feature", num_heads=16)
    dense = attnzoo.attention(q, k, v, "dense", causal=True)
    before = rel_err(m(q, k, v, causal=True), dense)
    m.fit_values(q, k, v, dense, causal=True)
    assert rel_err(m(q, k, v, causal=True), dense) < before


def test_unknown_feature_map_is_named(rng):
    with pytest.raises(UnknownNameError, match="feature map 'gelu'"):
        attnzoo.attention(*qkv(rng, Nq=8), "linear", causal=True, feature_map="gelu")


@pytest.mark.parametrize("cfg,argument", [
    (dict(decay="alibi", layer=3), "layer, num_layers"),
    (dict(decay="alibi", layer=6, num_layers=6), "layer"),
    (dict(decay="alibi", layer=0, num_layers=1), "num_layers"),
    (dict(decay=0.9, layer=1, num_layers=4), "decay"),
])
def test_transnormer_layer_settings_are_checked(cfg, argument):
    with pytest.raises(attnzoo.errors.InvalidArgumentError) as err:
        attnzoo.get_method("transnormer", **cfg)
    assert err.value.argument == argument


def test_transnormer_decay_falls_with_depth(rng):
    """TransNormerLLM scales the ALiBi slopes by 1 - l / (L - 1): the last layer barely decays, so
    it is (nearly) the undecayed attention and the first layer is the plain ALiBi decay."""
    q, k, v = qkv(rng, B=1, Nq=64)
    at = lambda **cfg: attnzoo.attention(q, k, v, "transnormer", causal=True, **cfg)  # noqa: E731
    assert rel_err(at(decay="alibi", layer=0, num_layers=4), at(decay="alibi")) <= 1e-4
    assert rel_err(at(decay="alibi", layer=3, num_layers=4), at()) <= 1e-3
    assert rel_err(at(decay="alibi", layer=1, num_layers=4), at(decay="alibi")) > 1e-2


def test_agent_grid_must_cover_the_queries(rng):
    q, k, v = qkv(rng, B=1, Nq=48)
    with pytest.raises(attnzoo.errors.InvalidArgumentError, match="grid"):
        attnzoo.attention(q, k, v, "agent", grid=(5, 8))
    with pytest.raises(attnzoo.errors.InvalidArgumentError, match="grid"):
        attnzoo.get_method("agent", grid=(48,))
