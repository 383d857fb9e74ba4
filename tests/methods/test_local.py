"""The local (position-pattern) family beyond the contract suite (tests/contract): the other
backends, degenerate settings vs dense, random shapes, layouts, stats and supports."""

from __future__ import annotations

import warnings

import pytest
import torch
from contract.cases import CASES, Case
from helpers import qkv, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo.method import check_qkv

LOCAL = [case for case in CASES if "local" in case.info.family]


@pytest.mark.parametrize("backend", ["naive", "flex"])
@pytest.mark.parametrize("case", LOCAL[::3], ids=[c.id for c in LOCAL[::3]])
def test_other_backends_equal_reference(case, backend, rng):
    m = case.make(backend=backend)
    q, k, v = case.inputs(rng, B=1)
    causal = case.causal_flags[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is not compiled
        out = m(q, k, v, causal=causal)
    assert rel_err(out, m.reference(q, k, v, causal=causal)) <= 1e-4


# settings under which each pattern covers everything: it must then equal exact attention
DEGENERATE = [
    ("sliding_window", dict(window=1000), None, (True, False)),
    ("sliding_window", dict(left=500, right=500), None, (True, False)),
    ("streaming", dict(sinks=0, window=500), None, (True,)),
    ("s2", dict(block_size=16, local_blocks=20, vert_stride=4), None, (True, False)),
    ("moa", dict(spans=500, sinks=0), None, (True,)),
    ("neighborhood", dict(kernel_size=(9, 11)), (9, 11), (False,)),
    ("neighborhood", dict(kernel_size=99), (99,), (True, False)),
    ("clear", dict(radius=20.0, num_global=2), (9, 11), (False,)),
    ("halo", dict(block_size=4, halo=12), (9, 11), (False,)),
    ("maxvit_block", dict(block_size=(9, 11)), (9, 11), (False,)),
    ("maxvit_grid", dict(grid_size=(9, 11)), (9, 11), (False,)),
    ("hilo", dict(alpha=0.0, window=8), (8, 8), (False,)),
    ("hilo", dict(alpha=1.0, window=1), (8, 12), (False,)),
    ("hilo", dict(alpha=0.25, window=1), (8, 12), (False,)),  # LITv2: window 1 makes every head global
]


@pytest.mark.parametrize("name,cfg,grid,causals", DEGENERATE, ids=[f"{d[0]}-{i}" for i, d in enumerate(DEGENERATE)])
def test_covering_everything_equals_dense(name, cfg, grid, causals, rng):
    case = Case(name, cfg, grid=grid, tokens=99)
    m = case.make()
    q, k, v = qkv(rng, Nq=case.length)
    for causal in causals:
        dense = attnzoo.attention(q, k, v, "dense", causal=causal)
        assert rel_err(m(q, k, v, causal=causal), dense) <= 1e-4


def test_causal_neighborhood_1d_is_prefix_invariant(rng):
    """Without a grid (a 1-D sequence of any length) a causal prefix is a call of its own."""
    q, k, v = qkv(rng, Nq=120)
    full = attnzoo.attention(q, k, v, "neighborhood", causal=True, kernel_size=9)
    part = attnzoo.attention(q[:, :, :50], k[:, :, :50], v[:, :, :50], "neighborhood", causal=True, kernel_size=9)
    assert rel_err(part, full[:, :, :50]) <= 1e-5


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 200), window=st.integers(1, 260), heads=st.sampled_from([(1, 1), (4, 2), (3, 3)]),
    causal=st.booleans(), d=st.sampled_from([8, 16]), extra=st.integers(0, 50),
)
def test_sliding_window_random_shapes(n, window, heads, causal, d, extra):
    gen = torch.Generator().manual_seed(n * 1000 + window)
    q, k, v = qkv(gen, B=1, Hq=heads[0], Hkv=heads[1], Nq=n, Nk=n + extra, D=d)
    m = attnzoo.get_method("sliding_window", window=window)
    assert rel_err(m(q, k, v, causal=causal), m.reference(q, k, v, causal=causal)) <= 1e-4


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(3, 20), cols=st.integers(3, 20), kr=st.sampled_from([1, 3, 5]), kc=st.sampled_from([1, 3]),
       dil=st.sampled_from([1, 2]), g=st.integers(0, 3))
def test_neighborhood_random_grids(rows, cols, kr, kc, dil, g):
    if kr * dil > rows or kc * dil > cols:
        return
    gen = torch.Generator().manual_seed(rows * 100 + cols)
    q, k, v = qkv(gen, B=1, Hq=2, Hkv=1, Nq=g + rows * cols)
    m = attnzoo.get_method("neighborhood", grid=(rows, cols), kernel_size=(kr, kc), dilation=dil, num_global=g)
    assert rel_err(m(q, k, v), m.reference(q, k, v)) <= 1e-4


def test_layout_is_built_without_a_dense_mask():
    """At N = 65,536 an N x N mask would be 4 GiB; the analytic layout is a few MB and milliseconds."""
    q = torch.empty(1, 1, 65536, 8)
    for name, cfg in (("sliding_window", dict(window=512)), ("neighborhood", dict(grid=(256, 256), kernel_size=13)),
                      ("s2", dict()), ("streaming", dict(window=1024))):
        m = attnzoo.get_method(name, **cfg)
        layout = m.build_layout(check_qkv(q, q, q, causal=m.info.causal, scale=None, check_finite=False))
        assert layout.kv_indices.numel() < 65536 * 2048
        assert 0 < layout.block_density() < 0.1


def test_stats_report_density(rng):
    q, k, v = qkv(rng, B=1, Nq=256)
    out, stats = attnzoo.get_method("sliding_window", window=32).__call__(q, k, v, causal=True, return_stats=True)
    exact = sum(min(i + 1, 32) for i in range(256)) / sum(i + 1 for i in range(256))
    assert stats.density == pytest.approx(exact)
    assert stats.extra["computed_fraction"] >= stats.density
    assert stats.attention_ms > 0


def test_support_is_the_reference_pattern(rng):
    """support() is the set of pairs the method attends to: its density equals the stats' density,
    and attention restricted to it is the reference."""
    q, k, v = qkv(rng, B=1, Nq=256)
    m = attnzoo.get_method("streaming", sinks=4, window=32)
    mask = m.support(q, k, v, causal=True)
    _, stats = m(q, k, v, causal=True, return_stats=True)
    assert float(mask.float().sum()) / (256 * 257 / 2) == pytest.approx(stats.density)
    from attnzoo.kernels.dense import masked_attention
    assert rel_err(masked_attention(q, k, v, mask, scale=q.shape[-1] ** -0.5), m.reference(q, k, v, causal=True)) <= 1e-6
    assert attnzoo.get_method("hilo", grid=(16, 16)).support(q, k, v) is None
    dense_support = attnzoo.get_method("dense").support(q, k, v, causal=True)
    assert dense_support.shape == (256, 256) and int(dense_support.sum()) == 256 * 257 // 2


def test_layout_cache_is_bounded_when_decoding(rng):
    """Decoding meets a new key length every step: only the most recent layouts stay cached."""
    m = attnzoo.get_method("streaming", sinks=2, window=8)
    q1 = qkv(rng, B=1, Hq=2, Hkv=2, Nq=1, Nk=1)[0]
    for n in range(1, 40):
        _, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=1, Nk=n)
        assert rel_err(m(q1, k, v, causal=True), m.reference(q1, k, v, causal=True)) <= 1e-5
    assert len(m._layouts) == m.cached_layouts


def _uniform_queries_one_hot_values(n, dim=4):
    """q = 0 (every visible key weighs the same) and v_j = e_j: output row i is 1/|keys of i| on them."""
    q = torch.zeros(1, 1, n, dim)
    return q, torch.randn(1, 1, n, dim), torch.eye(n)[None, None]


def test_clear_window_is_strictly_inside_the_radius():
    """The official mask is dist^2 < r^2: 193 keys around an inner query at r = 8 (197 with <=)."""
    q, k, v = _uniform_queries_one_hot_values(17 * 17)
    m = attnzoo.get_method("clear", grid=(17, 17), radius=8.0)
    centre = 8 * 17 + 8
    row = m(q, k, v)[0, 0, centre]
    assert int((row > 0).sum()) == 193 and torch.allclose(row[row > 0], torch.full((193,), 1 / 193))
    assert int(m.support(q, k, v)[centre].sum()) == 193
    assert not m.info.training_free  # CLEAR fine-tunes the model to its window


def test_clear_down_sampled_keys_join_the_softmax(rng):
    """radius 1 leaves each grid query itself and the global tokens; with down_factor f it also sees
    the f x f average of every cell, all under one softmax: q = 0 gives (v_i + sum of global v + sum
    of pooled v) / (1 + globals + cells)."""
    rows, cols, f, g = 6, 8, 2, 2
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, Nq=g + rows * cols, D=8)
    q = torch.zeros_like(q)
    m = attnzoo.get_method("clear", grid=(rows, cols), radius=1.0, down_factor=f, num_global=g)
    grid_v = v[0, 0, g:].view(rows // f, f, cols // f, f, -1)
    pooled = grid_v.mean(dim=(1, 3)).reshape(-1, v.shape[-1])  # (cells, Dv)
    want = (v[0, 0, g:] + v[0, 0, :g].sum(0) + pooled.sum(0)) / (1 + g + pooled.shape[0])
    out = m(q, k, v)
    assert rel_err(out[0, 0, g:], want) <= 1e-5 and rel_err(out[0, 1, g:], want) <= 1e-5
    assert rel_err(out[:, :, :g], attnzoo.attention(q, k, v, "dense")[:, :, :g]) <= 1e-5  # text tokens: every key
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=g + rows * cols, D=8)
    assert rel_err(m(q, k, v), m.reference(q, k, v)) <= 1e-5
    assert m.support(q, k, v) is None


def test_clear_down_factor_is_checked(rng):
    q, k, v = qkv(rng, B=1, Nq=48)
    with pytest.raises(attnzoo.errors.InvalidArgumentError, match="down_factor"):
        attnzoo.attention(q, k, v, "clear", grid=(6, 8), down_factor=4)
    with pytest.raises(attnzoo.errors.UnsupportedError, match="2-D grid"):
        attnzoo.attention(q, k, v, "clear", grid=(2, 4, 6), down_factor=2)


def test_hilo_lo_fi_heads_are_int_alpha_h(rng):
    """LITv2 takes int(alpha H) Lo-Fi heads: 1 of 3 at alpha = 0.5 (round would give 2); they are the last heads."""
    q, k, v = qkv(rng, B=1, Hq=3, Hkv=3, Nq=64)
    hilo = lambda alpha: attnzoo.attention(q, k, v, "hilo", grid=(8, 8), alpha=alpha, window=2)  # noqa: E731
    mixed, hi_fi, lo_fi = hilo(0.5), hilo(0.0), hilo(1.0)
    assert rel_err(mixed[:, :2], hi_fi[:, :2]) <= 1e-6 and rel_err(mixed[:, 2:], lo_fi[:, 2:]) <= 1e-6
