"""The contracts of the layout: learned state in modules (not configs), the attention() cache,
host synchronisation only with stats, torch.compile, the registries of each kind, mask combinators."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from helpers import qkv, rel_err

import attnzoo
import attnzoo.method
from attnzoo import cache, modules
from attnzoo.cli import main as cli_main
from attnzoo.errors import InvalidArgumentError, UnknownNameError
from attnzoo.masks import and_masks, evaluate, or_masks
from attnzoo.methods.learned.maps import HedgehogFeatureMap
from attnzoo.registry import CACHES, METHODS, MODULES, ComponentInfo


def _perturbed_map(heads: int, dim: int, gen: torch.Generator) -> HedgehogFeatureMap:
    fmap = HedgehogFeatureMap(heads, dim)
    with torch.no_grad():
        for p in fmap.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    return fmap


def test_attention_cache_never_runs_another_objects_state(rng):
    """Two trained feature maps have the same repr; attention() must run each one's own map."""
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=32, D=8)
    a, b = _perturbed_map(2, 8, rng), _perturbed_map(2, 8, rng)
    assert repr(a) == repr(b)
    out_a = attnzoo.attention(q, k, v, "hedgehog", causal=True, feature_map=a)
    out_b = attnzoo.attention(q, k, v, "hedgehog", causal=True, feature_map=b)
    assert torch.equal(out_a, attnzoo.get_method("hedgehog", feature_map=a)(q, k, v, causal=True))
    assert torch.equal(out_b, attnzoo.get_method("hedgehog", feature_map=b)(q, k, v, causal=True))
    assert rel_err(out_a, out_b) > 1e-3, rng.initial_seed()


def test_attention_cache_keys_plain_values_by_value(rng):
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=40, D=8)
    narrow = attnzoo.attention(q, k, v, "sliding_window", causal=True, window=3)
    wide = attnzoo.attention(q, k, v, "sliding_window", causal=True, window=30)
    assert not torch.equal(narrow, wide)
    assert torch.equal(narrow, attnzoo.attention(q, k, v, "sliding_window", causal=True, window=3))


def test_fit_trains_module_state_and_leaves_the_config(rng):
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, Nq=48, D=8)
    m = attnzoo.get_method("hedgehog")
    config_before = dataclasses.asdict(m.config)
    m.fit(q, k, causal=True, steps=5, window=16)
    assert dataclasses.asdict(m.config) == config_before
    assert isinstance(m.feature_map, HedgehogFeatureMap) and any(n.startswith("feature_map.") for n in m.state_dict())
    fresh = attnzoo.get_method("hedgehog")
    fresh.materialize(2, 1, 8, 8)
    assert not torch.equal(fresh(q, k, v, causal=True), m(q, k, v, causal=True))
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(q, k, v, causal=True), m(q, k, v, causal=True))


def test_random_feature_values_are_parameters(rng):
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=24, D=4)
    m = attnzoo.get_method("random_feature", num_heads=3)
    assert list(m.parameters()) == []
    m.materialize(2, 2, 4, 4)
    assert [n for n, _ in m.named_parameters()] == ["values"]
    target = attnzoo.attention(q, k, v, "dense")
    m.fit_values(q, k, v, target)
    assert m.values.shape == (3, 4, 4) and not hasattr(m.config, "values")


@pytest.mark.parametrize("name,cfg,causal", [("dense", {}, True), ("sliding_window", dict(window=8), True),
                                              ("hip", dict(top_k=2, block_size=16), True), ("linear", {}, False)])
def test_device_is_synchronised_only_when_stats_are_asked_for(name, cfg, causal, rng, monkeypatch):
    calls = []
    monkeypatch.setattr(attnzoo.method, "sync", lambda device: calls.append(device))
    m = attnzoo.get_method(name, **cfg)
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=64, D=8)
    m(q, k, v, causal=causal)
    assert calls == []
    m(q, k, v, causal=causal, return_stats=True)
    assert len(calls) >= 2


@pytest.mark.parametrize("name,cfg,causal", [
    ("dense", {}, True),
    ("sliding_window", dict(window=16), True),
    ("neighborhood", dict(kernel_size=3, grid=(8, 8)), False),
    ("neighborhood", dict(kernel_size=5, grid=(6, 10), num_global=4), False),
])
def test_attention_compiles_to_one_graph(name, cfg, causal, rng):
    torch._dynamo.reset()
    n = 64 if cfg.get("grid") is None else cfg.get("num_global", 0) + cfg["grid"][0] * cfg["grid"][1]
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, Nq=n, D=8)
    compiled = torch.compile(lambda q, k, v: attnzoo.attention(q, k, v, name, causal=causal, **cfg), fullgraph=True, backend="aot_eager")
    m = attnzoo.get_method(name, **cfg)
    out = compiled(q, k, v)
    assert rel_err(out, m.reference(q, k, v, causal=causal)) < 1e-5, rng.initial_seed()
    assert rel_err(out, m(q, k, v, causal=causal)) < 1e-5


def test_dense_compiles_with_inductor(rng):
    torch._dynamo.reset()
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=32, D=8)
    compiled = torch.compile(lambda q, k, v: attnzoo.attention(q, k, v, "dense", causal=True), fullgraph=True)
    assert rel_err(compiled(q, k, v), attnzoo.get_method("dense").reference(q, k, v, causal=True)) < 1e-5


# ---- registries of each kind ----------------------------------------------------------------
@dataclass
class _NoConfig:
    pass


class _KeepLast(cache.CachePolicy):
    """A throwaway policy scoring keys by position (the newest kept first)."""

    info = ComponentInfo("test_keep_last", "test policy", None, ("decode",), "newest keys first")
    Config = _NoConfig

    def score(self, queries, keys, values):
        return torch.arange(keys.shape[2], dtype=torch.float32).expand(*keys.shape[:3])


class _Scale(modules.AttentionModule):
    """A throwaway block."""

    info = ComponentInfo("TestScale", "test module", None, ("module",))

    def __init__(self, factor: float = 2.0):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


@pytest.fixture
def throwaways():
    cache.register(_KeepLast)
    modules.register(_Scale)
    yield
    CACHES.unregister("test_keep_last")
    MODULES.unregister("TestScale")


def test_each_kind_registers_creates_and_lists(throwaways, capsys):
    policy = cache.get_policy("test_keep_last")
    assert policy.score(None, torch.zeros(1, 2, 5, 4), None)[0, 0].argmax() == 4
    assert modules.create("TestScale", factor=3.0)(torch.ones(2)).tolist() == [3.0, 3.0]
    assert "test_keep_last" in [i.name for i in cache.list_policies()]
    assert cli_main(["list", "--kind", "modules"]) == 0
    assert "TestScale" in capsys.readouterr().out
    with pytest.raises(UnknownNameError, match="option of cache policy 'test_keep_last'"):
        cache.get_policy("test_keep_last", ratio=0.5)


def test_names_are_unique_across_kinds(throwaways):
    clash = type("Clash", (cache.CachePolicy,), {"info": ComponentInfo("sliding_window", "x", None, ("decode",)), "Config": _NoConfig})
    METHODS.load()
    with pytest.raises(ValueError, match="'sliding_window' is already registered as a method"):
        cache.register(clash)


def test_a_kind_takes_only_its_base_class():
    with pytest.raises(InvalidArgumentError, match="subclass of CachePolicy"):
        cache.register(_Scale)
    with pytest.raises(UnknownNameError, match="unknown kind 'presses'"):
        attnzoo.registry.kind("presses")


# ---- masks --------------------------------------------------------------------------------------
def test_mask_combinators_build_a_causal_band_with_sinks():
    def causal(b, h, q, kv):
        return kv <= q

    def band(b, h, q, kv):
        return kv >= q - 2

    def sinks(b, h, q, kv):
        return kv < 1

    mask = evaluate(or_masks(and_masks(causal, band), and_masks(causal, sinks)), 1, 6, 6)[0]
    expected = torch.tensor([[1 if (j <= i and (j >= i - 2 or j == 0)) else 0 for j in range(6)] for i in range(6)], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert int(evaluate(and_masks(causal, band), 1, 6, 6).sum()) == 6 + 5 + 4


def test_pattern_mask_mod_and_layout_agree(rng):
    """The layout the executor runs and the method's mask_mod (the compiled path) give the same output."""
    m = attnzoo.get_method("streaming", sinks=3, window=10)
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=50, D=8)
    call = m._prepare(q, k, v, True, None)
    assert rel_err(m._masked_forward(q, k, v, call), m(q, k, v, causal=True)) < 1e-5


# ---- log-sum-exp at the method level --------------------------------------------------------------
LSE_CASES = [
    ("dense", {}, True, None),
    ("dense", {}, False, None),
    ("sliding_window", dict(window=9), True, None),
    ("streaming", dict(sinks=2, window=12), True, None),
    ("s2", dict(block_size=8, local_blocks=1, vert_stride=3), True, None),
    ("neighborhood", dict(kernel_size=3), False, (6, 8)),
    ("neighborhood", dict(kernel_size=3, num_global=2), False, (6, 8)),
    ("block_sparse", dict(top_k=2, block_size=8), True, None),
    ("hip", dict(top_k=2, block_size=8), True, None),
    ("biformer", dict(n_win=4, topk=2), False, None),
    ("routing", dict(num_clusters=3, block_size=8), True, None),
    ("sea", dict(top_k=8, q_block=8), True, None),
]


@pytest.mark.parametrize("name,cfg,causal,grid", LSE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(LSE_CASES)])
def test_forward_with_lse_is_the_log_normaliser_over_the_support(name, cfg, causal, grid, rng):
    """lse equals logsumexp of the scaled logits over the method's support (written here plainly),
    and the output equals the plain call."""
    if grid is not None:
        cfg = dict(cfg, grid=grid)
    n = 64 if grid is None else cfg.get("num_global", 0) + grid[0] * grid[1]
    m = attnzoo.get_method(name, **cfg)
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=n, D=8)
    out, lse = m.forward_with_lse(q, k, v, causal=causal)
    support = m.support(q, k, v, causal=causal).expand(2, 4, n, n)
    if causal:
        support = support & torch.ones(n, n, dtype=torch.bool).tril()
    logits = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 8 ** -0.5
    expected = torch.logsumexp(logits.masked_fill(~support, float("-inf")), -1)
    assert lse.shape == (2, 4, n) and torch.allclose(lse.double(), expected, atol=1e-4), rng.initial_seed()
    assert rel_err(out, m(q, k, v, causal=causal)) < 1e-5


def test_lse_results_merge_over_disjoint_key_sets(rng):
    """A causal call split into the last 16 keys (sliding window) and the rest (dense on the
    earlier keys) merges back into dense attention through attnzoo.merge_attention."""
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=40, D=8)
    near, lse_near = attnzoo.attention_with_lse(q, k, v, "sliding_window", causal=True, window=16)
    early = torch.ones(40, 40, dtype=torch.bool).tril(-16)
    far, lse_far = attnzoo.kernels.dense.attention_with_lse(q, k, v, mask=early)
    merged, lse = attnzoo.merge_attention([near, far], [lse_near, lse_far])
    dense, lse_dense = attnzoo.attention_with_lse(q, k, v, "dense", causal=True)
    assert rel_err(merged, dense) < 1e-5 and torch.allclose(lse, lse_dense, atol=1e-5)


@pytest.mark.parametrize("name", ["linear", "sgformer", "hyper"])
def test_methods_without_an_lse_form_say_so(name, rng):
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=64, D=8)
    m = attnzoo.get_method(name, **({"grid": (8, 8), "n_win": 4} if name == "sgformer" else {}))
    with pytest.raises(attnzoo.UnsupportedError, match="no log-sum-exp form"):
        m.forward_with_lse(q, k, v, causal=m.info.causal)
