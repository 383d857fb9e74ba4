"""The linear family: each method against its quadratic reference (outputs and gradients), causal
prefix invariance, GQA and cross-attention alignment, half precision, degenerate settings that are
exact attention, the fits of the learned parts, and argument errors."""

from __future__ import annotations

import pytest
import torch
from helpers import qkv, rel_err

import attnzoo
from attnzoo.errors import AttnzooError, InvalidArgumentError, UnknownNameError, UnsupportedError

# learned feature maps hold parameters, so their outputs require grad when rel_err reads them
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")

CASES = [
    ("linear", dict()),
    ("linear", dict(feature_map="relu", chunk=16)),
    ("linear", dict(feature_map="softmax")),
    ("performer", dict(num_features=32)),
    ("lightning", dict(decay="alibi", chunk=32)),
    ("lightning", dict(decay=[0.5, 0.9, 0.99, 1.0], feature_map="silu")),
    ("lightning", dict()),
    ("transnormer", dict(chunk=32)),
    ("transnormer", dict(decay=0.95, lrpe=False)),
    ("transnormer", dict(mode="diag", block_size=32)),
    ("hedgehog", dict(width=8)),
    ("linfusion", dict()),
    ("rala", dict()),
    ("inline", dict()),
    ("inline", dict(feature_map="elu", window=0)),
    ("agent", dict(num_agents=10)),
    ("random_feature", dict(num_heads=6, query_block=32)),
    ("random_feature", dict(num_heads=4, activation="softmax", query_block=50)),
    ("scatterbrain", dict(num_features=16, bucket_chunk=16)),
    ("sea", dict(top_k=24, q_block=16)),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in c.items())}" for n, c in CASES]
NAMES = ("linear", "performer", "random_feature", "hedgehog", "lightning", "transnormer", "rala", "inline", "agent",
         "linfusion", "scatterbrain", "sea")


def modes(m):
    """The causal settings a configured method runs (a decay needs causal=True)."""
    if getattr(m.config, "decay", None) is not None and getattr(m.config, "mode", "norm") == "norm":
        return [True]
    return [c for c in (True, False) if (m.info.causal if c else m.info.non_causal)]


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


@pytest.mark.parametrize("name,cfg", CASES, ids=IDS)
def test_fast_path_equals_reference(name, cfg, rng):
    m = attnzoo.get_method(name, **cfg)
    q, k, v = small(*qkv(rng, B=2, Hq=4, Hkv=2, Nq=150, D=16, Dv=8))
    for causal in modes(m):
        with torch.no_grad():  # learned feature maps hold parameters
            out, ref = m(q, k, v, causal=causal), m.reference(q, k, v, causal=causal)
        assert out.shape == (2, 4, 150, 8)
        assert rel_err(out, ref) <= 1e-4, (causal, rng.initial_seed())


@pytest.mark.parametrize("name,cfg", [c for c in CASES if c[0] not in ("scatterbrain",) and c[1].get("mode") != "diag"],
                         ids=[i for c, i in zip(CASES, IDS) if c[0] not in ("scatterbrain",) and c[1].get("mode") != "diag"])
def test_cross_attention_aligns_bottom_right(name, cfg, rng):
    m = attnzoo.get_method(name, **cfg)
    for nq, nk in ((37, 150), (150, 60)):
        q, k, v = small(*qkv(rng, Nq=nq, Nk=nk))
        for causal in modes(m):
            with torch.no_grad():
                out, ref = m(q, k, v, causal=causal), m.reference(q, k, v, causal=causal)
            assert rel_err(out, ref) <= 1e-4, (nq, nk, causal)


def _grads(fn, q, k, v, gen):
    out = fn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=gen, dtype=out.dtype))


@pytest.mark.parametrize("name,cfg", CASES, ids=IDS)
def test_gradients_equal_reference(name, cfg, rng):
    m = attnzoo.get_method(name, **cfg)
    q, k, v = qkv(rng, B=1, Hq=4, Hkv=2, Nq=70, D=8, Dv=4, dtype=torch.float64)
    q, k = (q * 0.5).requires_grad_(), (k * 0.5).requires_grad_()
    v.requires_grad_()
    for causal in modes(m):
        seed = rng.initial_seed()
        got = _grads(lambda a, b, c: m(a, b, c, causal=causal), q, k, v, torch.Generator().manual_seed(seed))
        want = _grads(lambda a, b, c: m.reference(a, b, c, causal=causal), q, k, v, torch.Generator().manual_seed(seed))
        for g, w in zip(got, want):
            assert rel_err(g, w) <= 1e-6, (causal, seed)


PREFIX = [("linear", dict(chunk=16)), ("performer", dict(num_features=32)), ("lightning", dict(decay="alibi", chunk=16)),
          ("transnormer", dict(decay=0.9)), ("transnormer", dict(mode="diag", block_size=16)), ("hedgehog", dict()),
          ("inline", dict()), ("random_feature", dict(num_heads=4)), ("sea", dict(top_k=16, q_block=16))]


@pytest.mark.parametrize("name,cfg", PREFIX, ids=[f"{n}{i}" for i, (n, _) in enumerate(PREFIX)])
def test_causal_prefix_invariance(name, cfg, rng):
    """Causal outputs on a prefix equal the first rows of the full run (sea: cuts at its query blocks;
    scatterbrain is not prefix invariant: its LSH chunks are formed over the whole sequence)."""
    m = attnzoo.get_method(name, **cfg)
    q, k, v = small(*qkv(rng, Nq=150))
    full = m(q, k, v, causal=True)
    for cut in (1, 64, 96) if name != "sea" else (16, 64, 96):
        part = m(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], causal=True)
        assert rel_err(part, full[:, :, :cut]) <= 1e-5, (cut, rng.initial_seed())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,cfg", CASES[::2], ids=IDS[::2])
def test_half_precision(name, cfg, dtype, rng):
    m = attnzoo.get_method(name, **cfg)
    q, k, v = small(*qkv(rng, Nq=100, dtype=dtype))
    causal = modes(m)[0]
    out = m(q, k, v, causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, m.reference(q, k, v, causal=causal)) <= 2e-2


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


@pytest.mark.parametrize("name", ["rala", "agent", "linfusion"])
def test_non_causal_methods_refuse_causal(name, rng):
    with pytest.raises(UnsupportedError, match="causal"):
        attnzoo.attention(*qkv(rng, Nq=8), name, causal=True)


def test_decay_needs_causal(rng):
    with pytest.raises(UnsupportedError, match="decay"):
        attnzoo.attention(*qkv(rng, Nq=8), "lightning", causal=False, decay=0.9)


@pytest.mark.parametrize("name,cfg,exc", [
    ("linear", dict(feature_map="gelu"), UnknownNameError),
    ("linear", dict(chunk=0), InvalidArgumentError),
    ("performer", dict(num_features=0), InvalidArgumentError),
    ("lightning", dict(decay=1.5), InvalidArgumentError),
    ("lightning", dict(decay=[0.9, 0.8]), InvalidArgumentError),
    ("transnormer", dict(mode="banded"), InvalidArgumentError),
    ("hedgehog", dict(feature_map="spiky"), InvalidArgumentError),
    ("random_feature", dict(activation="tanh"), InvalidArgumentError),
    ("random_feature", dict(values=torch.zeros(3, 4, 4)), InvalidArgumentError),
    ("scatterbrain", dict(num_buckets=3), InvalidArgumentError),
    ("sea", dict(top_k=0), InvalidArgumentError),
    ("agent", dict(num_agents=-1), InvalidArgumentError),
])
def test_bad_config_is_named(name, cfg, exc, rng):
    with pytest.raises(exc) as err:
        attnzoo.attention(*qkv(rng, Nq=8), name, causal=True, **cfg)
    assert isinstance(err.value, AttnzooError)
    arg = next(iter(cfg))
    assert arg in str(err.value) or (arg == "feature_map" and "feature map" in str(err.value))
