"""The public API and its errors: every bad input names the argument, the expected and the received."""

from __future__ import annotations

import pytest
import torch
from helpers import qkv, rel_err

import attnzoo
from attnzoo import InvalidArgumentError, UnknownNameError, UnsupportedError


def test_dense_equals_sdpa_and_reference(rng):
    q, k, v = qkv(rng, Hq=4, Hkv=2, Nq=70, Nk=90, Dv=8)
    for causal in (False, True):
        m = attnzoo.get_method("dense")
        assert rel_err(m(q, k, v, causal=causal), m.reference(q, k, v, causal=causal)) <= 1e-5


def test_attention_and_get_method_agree(rng):
    q, k, v = qkv(rng, Nq=80)
    a = attnzoo.attention(q, k, v, "sliding_window", causal=True, window=16)
    b = attnzoo.get_method("sliding_window", window=16)(q, k, v, causal=True)
    assert torch.equal(a, b)


def test_list_methods_carries_complete_info():
    infos = attnzoo.list_methods()
    names = {i.name for i in infos}
    assert {"dense", "sliding_window", "streaming", "neighborhood", "clear", "halo", "maxvit_block", "maxvit_grid", "hilo", "s2", "moa"} <= names
    for i in infos:
        assert i.title and i.time and i.memory and i.family
        assert i.causal or i.non_causal
    assert all("local" in i.family for i in attnzoo.list_methods("local"))


def test_info_is_reachable_from_the_method_object():
    info = attnzoo.get_method("neighborhood").info
    assert info.arxiv == "2403.04690" and info.spatial and not info.cross


@pytest.mark.parametrize(
    "shapes,argument",
    [
        (((2, 4, 8, 16), (3, 2, 8, 16), (3, 2, 8, 16)), "k, v"),  # batch
        (((2, 4, 8, 16), (2, 2, 8, 8), (2, 2, 8, 16)), "k"),  # head_dim
        (((2, 4, 8, 16), (2, 2, 8, 16), (2, 2, 9, 16)), "v"),  # tokens
        (((2, 4, 8, 16), (2, 2, 8, 16), (2, 3, 8, 16)), "v"),  # heads
        (((2, 5, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16)), "q"),  # Hq not a multiple of Hkv
        (((2, 4, 8), (2, 2, 8, 16), (2, 2, 8, 16)), "q"),  # not 4-D
    ],
)
def test_shape_errors_name_argument_expected_and_received(shapes, argument):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(InvalidArgumentError) as e:
        attnzoo.attention(q, k, v, "sliding_window", window=4)
    assert e.value.argument == argument
    assert "expected" in str(e.value) and "got" in str(e.value)


def test_dtype_and_type_errors():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(InvalidArgumentError, match="dtype"):
        attnzoo.attention(q, q.double(), q)
    with pytest.raises(InvalidArgumentError, match="torch.Tensor"):
        attnzoo.attention(q.numpy(), q, q)
    with pytest.raises(InvalidArgumentError, match="dtype float32"):
        attnzoo.attention(q.int(), q.int(), q.int())
    with pytest.raises(InvalidArgumentError, match="causal: expected a bool"):
        attnzoo.attention(q, q, q, causal=1)
    with pytest.raises(InvalidArgumentError, match="scale"):
        attnzoo.attention(q, q, q, scale=-1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_reported(bad):
    q = torch.randn(1, 2, 16, 8)
    k = q.clone()
    k[0, 1, 3, 2] = bad
    with pytest.raises(InvalidArgumentError, match=r"k: expected finite values, got (1 NaN|0 NaN and 1 infinite)"):
        attnzoo.attention(q, k, q, "sliding_window", window=4)


def test_unknown_method_suggests_closest_names():
    with pytest.raises(UnknownNameError, match="did you mean 'sliding_window'"):
        attnzoo.get_method("sliding_windw")
    with pytest.raises(UnknownNameError, match="did you mean 'neighborhood'"):
        attnzoo.attention(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4), "neighbourhood")


def test_unknown_option_is_named():
    with pytest.raises(UnknownNameError, match="unknown option of method 'sliding_window' 'windw'; did you mean 'window'"):
        attnzoo.get_method("sliding_window", windw=3)


@pytest.mark.parametrize(
    "name,config,match",
    [
        ("sliding_window", dict(window=0), "window: expected an integer >= 1, got 0"),
        ("sliding_window", dict(window=-3), "window: expected an integer >= 1, got -3"),
        ("sliding_window", dict(window=4, left=2), "either window or left/right"),
        ("streaming", dict(window=0), "window: expected an integer >= 1"),
        ("clear", dict(radius=0), r"radius: expected a number in \(0.0"),
        ("moa", dict(spans=[4, 0]), r"spans\[1\]: expected an integer >= 1, got 0"),
        ("hilo", dict(alpha=1.5), r"alpha: expected a number in \[0.0, 1.0\], got 1.5"),
        ("neighborhood", dict(grid=(4, 0)), r"grid\[1\]: expected an integer >= 1, got 0"),
        ("neighborhood", dict(backend="cuda"), "backend: expected one of"),
    ],
)
def test_config_errors(name, config, match):
    with pytest.raises(InvalidArgumentError, match=match):
        attnzoo.get_method(name, **config)


@pytest.mark.parametrize(
    "name,config,n,match",
    [
        ("neighborhood", dict(grid=(8, 8)), 65, r"grid: expected a product equal to N - num_global = 65 - 0 = 65, got \(8, 8\) \(product 64\)"),
        ("neighborhood", dict(grid=(8, 8), num_global=2), 64, "N - num_global = 64 - 2 = 62"),
        ("neighborhood", dict(grid=(8, 8), kernel_size=9), 64, r"kernel_size\[0\] \* dilation\[0\]: expected at most the grid size 8"),
        ("neighborhood", dict(grid=(8, 8), kernel_size=3, dilation=(3, 1)), 64, r"expected at most the grid size 8 along axis 0, got 3 \* 3 = 9"),
        ("neighborhood", dict(grid=(8, 8), kernel_size=4), 64, "an odd size on a non-causal axis"),
        ("neighborhood", dict(grid=(8, 8), kernel_size=(3, 3, 3)), 64, r"kernel_size: expected an int or 2 ints"),
        ("maxvit_grid", dict(grid=(8, 8), grid_size=3), 64, r"grid_size\[0\]: expected a divisor of the grid size 8"),
        ("hilo", dict(grid=(8, 8), window=3), 64, "window: expected a divisor of both grid sides"),
        ("clear", dict(grid=(64,)), 64, r"supports \(2, 3\)-D grids"),
    ],
)
def test_grid_errors(name, config, n, match, rng):
    q, k, v = qkv(rng, Nq=n)
    with pytest.raises((InvalidArgumentError, UnsupportedError), match=match):
        attnzoo.get_method(name, **config)(q, k, v)


@pytest.mark.parametrize(
    "name,config,causal,nk,match",
    [
        ("hilo", dict(grid=(8, 8)), True, 64, "'hilo' does not support causal=True"),
        ("streaming", dict(), False, 64, "'streaming' does not support causal=False"),
        ("neighborhood", dict(grid=(8, 8)), False, 80, "needs self-attention"),
        ("clear", dict(grid=(8, 8)), False, 80, "needs self-attention"),
        ("neighborhood", dict(grid=(7, 9), num_global=1), True, 64, "causal=True needs num_global=0"),
    ],
)
def test_unsupported_patterns_are_refused(name, config, causal, nk, match, rng):
    q, k, v = qkv(rng, Nq=64, Nk=nk)
    with pytest.raises(UnsupportedError, match=match):
        attnzoo.get_method(name, **config)(q, k, v, causal=causal)


def test_moa_head_count_must_match(rng):
    q, k, v = qkv(rng, Hq=4, Hkv=2, Nq=32)
    with pytest.raises(InvalidArgumentError, match=r"spans: expected 4 values \(one per query head\), got 3"):
        attnzoo.attention(q, k, v, "moa", causal=True, spans=[4, 8, 16])


def test_hilo_split_must_respect_gqa_groups(rng):
    q, k, v = qkv(rng, Hq=4, Hkv=2, Nq=64)
    with pytest.raises(InvalidArgumentError, match="multiple of the GQA group size 2"):
        attnzoo.attention(q, k, v, "hilo", grid=(8, 8), alpha=0.25)
