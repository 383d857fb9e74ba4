"""The method contract, checked on every case of ``cases.py`` (every registered method).

Tolerances are relative Frobenius errors (``helpers.rel_err``):

* float32 fast path vs reference, 1e-4: both compute the same function (the same selection, the
  same feature maps) in other orders (block-wise softmaxes merged by log-sum-exp, chunked linear
  states, sums over up to 301 keys), so they differ by float32 rounding: the worst of all cases
  over three seeds measures 2.7e-6 (inline, elu map). A key wrongly dropped or added in a single
  row of one head moves the whole output by ~1e-3 at these sizes, ten times the tolerance.
  Linear methods' references are the quadratic forms of the same kernels (no softmax), so they
  agree to the same rounding.
* float64 gradients vs the reference's, 1e-8 (worst measured 5e-10): float64 rounding is ~1e-16
  per operation; what is left is the conditioning of long chains (normalisers, decays).
* bfloat16 / float16 vs the float32 reference on the same rounded inputs: 2e-2 / 5e-3, 2.5 and 6
  times the worst measured (7.9e-3 / 8.6e-4, inline with the elu map): bfloat16 keeps 8
  significant bits (2^-8 = 4e-3 for the output alone), float16 11 (5e-4); intermediate roundings
  add a few of those.
* exact equalities (GQA vs repeated heads, causal prefixes): 1e-5, float32 reassociation only.
"""

from __future__ import annotations

import pytest
import torch
from contract.cases import CASES, MODES, Case
from helpers import rel_err

import attnzoo
from attnzoo.errors import InvalidArgumentError, UnknownNameError, UnsupportedError
from attnzoo.method import CallStats

F32_TOL = 1e-4
F64_GRAD_TOL = 1e-8
HALF_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
EQUAL_TOL = 1e-5

REGISTERED = {info.name for info in attnzoo.list_methods()}
CHECKS: set[str] = set()  # the names params() was called with: what a case's xfail may name

# learned feature maps hold parameters, so outputs outside no_grad require grad
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")


def params(check: str, *, when=lambda case: True, variants=lambda case: [None]):
    """pytest params (case, variant) for ``check`` on the cases where ``when`` holds, marked xfail
    where the case lists ``check`` or ``check-variant`` in its ``xfail`` (or looks ahead, for the
    prefix check: skipped with the reason). Cases of unregistered methods are left to ``test_every_case_names_a_registered_method``."""
    CHECKS.add(check)
    out = []
    for case in CASES:
        if case.method not in REGISTERED or not when(case):
            continue
        for variant in variants(case):
            name = check if variant is None else f"{check}-{_variant_id(variant)}"
            known = case.xfail.get(name) or case.xfail.get(check)
            marks = [pytest.mark.xfail(strict=True, raises=known.raises, reason=known.reason)] if known else []
            if check == "prefix" and case.prefix:  # a check that may pass or fail by chance proves nothing: skip, saying why
                marks = [pytest.mark.skip(reason=f"not prefix invariant by design: {case.prefix}")]
            out.append(pytest.param(case, variant, marks=marks, id=case.id if variant is None else f"{case.id}-{_variant_id(variant)}"))
    return out


def _variant_id(variant) -> str:
    if isinstance(variant, bool):
        return "causal" if variant else "non_causal"
    if isinstance(variant, torch.dtype):
        return str(variant).removeprefix("torch.")
    return str(variant)


def first_flag(case: Case) -> bool:
    """The one ``causal=`` value single-mode checks run: causal where supported."""
    return case.causal_flags[0]


def test_every_registered_method_has_a_case():
    missing = REGISTERED - {case.method for case in CASES}
    assert not missing, f"registered methods without a contract case in tests/contract/cases.py: {sorted(missing)}"


def test_every_case_names_a_registered_method():
    unknown = {case.method for case in CASES} - REGISTERED
    assert not unknown, f"contract cases of unregistered methods: {sorted(unknown)}"


def test_cases_are_well_formed():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), "two cases share an id"
    for case in CASES:
        assert set(case.unsupported) <= set(MODES), case.id
        assert {name.split("-")[0] for name in case.xfail} <= CHECKS, (case.id, sorted(case.xfail))
        assert case.causal_flags, f"{case.id}: no causal mode runs"
        assert case.bad, f"{case.id}: give at least one invalid option value"


@pytest.mark.parametrize("case,causal", params("reference", variants=lambda c: c.causal_flags))
def test_fast_path_equals_reference(case, causal, rng):
    m = case.make()
    q, k, v = case.inputs(rng)
    with torch.no_grad():
        out, ref = m(q, k, v, causal=causal), m.reference(q, k, v, causal=causal)
    assert out.shape == ref.shape == (2, 4, case.length, 8)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) <= F32_TOL


@pytest.mark.parametrize("case,causal", params("cross", when=lambda c: c.supports("cross"), variants=lambda c: c.causal_flags))
def test_cross_attention_equals_reference(case, causal, rng):
    """Nq != Nk, causal masks aligned bottom-right: fewer queries than keys (a prefill over a cache)
    and more (the first queries see few keys or none)."""
    m = case.make()
    for nq, nk in ((37, case.length), (case.length, 60)):
        q, k, v = case.inputs(rng, nq=nq, nk=nk)
        with torch.no_grad():
            out, ref = m(q, k, v, causal=causal), m.reference(q, k, v, causal=causal)
        assert out.shape == (2, 4, nq, 8)
        assert rel_err(out, ref) <= F32_TOL, (nq, nk)


@pytest.mark.parametrize("case,_", params("gqa", when=lambda c: c.supports("gqa")))
def test_grouped_query_attention_equals_repeated_heads(case, _, rng):
    m = case.make()
    q, k, v = case.inputs(rng)
    causal = first_flag(case)
    with torch.no_grad():
        grouped = m(q, k, v, causal=causal)
        repeated = m(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), causal=causal)
    assert rel_err(grouped, repeated) <= EQUAL_TOL


@pytest.mark.parametrize("case,mode", params("unsupported", when=lambda c: any(not c.supports(m) for m in MODES),
                                             variants=lambda c: [m for m in MODES if not c.supports(m)]))
def test_unsupported_mode_raises(case, mode, rng):
    m = case.make()
    shape = {"causal": {}, "non_causal": {}, "cross": {"nq": 37, "nk": case.length}, "gqa": {"Hkv": 1, "Hq": 4}}[mode]
    causal = {"causal": True, "non_causal": False}.get(mode, first_flag(case))
    q, k, v = case.inputs(rng, **shape)
    with pytest.raises(UnsupportedError, match=case.refusal(mode)):
        m(q, k, v, causal=causal)


@pytest.mark.parametrize("case,_", params("prefix", when=lambda c: c.supports("causal")))
def test_causal_outputs_ignore_later_tokens(case, _, rng):
    """The first n causal outputs do not change when the tokens after n change, nor when the call
    stops at n (a prefill that later grows). Cases that say why their method looks ahead
    (``Case.prefix``) are skipped with that reason."""
    m = case.make()
    q, k, v = case.inputs(rng)
    with torch.no_grad():
        full = m(q, k, v, causal=True)
        for cut in case.prefix_cuts:
            later = case.inputs(rng)
            changed = [torch.cat([x[:, :, :cut], y[:, :, cut:]], dim=2) for x, y in zip((q, k, v), later)]
            assert rel_err(m(*changed, causal=True)[:, :, :cut], full[:, :, :cut]) <= EQUAL_TOL, cut
            if case.grid is None and not case.length_dependent:
                part = m(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], causal=True)
                assert rel_err(part, full[:, :, :cut]) <= EQUAL_TOL, ("truncated", cut)


@pytest.mark.parametrize("case,dtype", params("half", variants=lambda c: [torch.bfloat16, torch.float16]))
def test_half_precision_stays_close_to_float32(case, dtype, rng):
    m = case.make()
    causal = first_flag(case)
    q, k, v = (x.to(dtype) for x in case.inputs(rng))
    with torch.no_grad():
        out = m(q, k, v, causal=causal)
        ref = m.reference(q.float(), k.float(), v.float(), causal=causal)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    assert rel_err(out, ref) <= HALF_TOL[dtype]


@pytest.mark.parametrize("case,causal", params("gradients", variants=lambda c: c.causal_flags))
def test_gradients_flow_and_equal_the_reference(case, causal, rng):
    m = case.make()
    q, k, v = (x.double().requires_grad_() for x in case.inputs(rng))
    out = m(q, k, v, causal=causal)
    weight = torch.randn(out.shape, generator=rng, dtype=torch.float64)
    got = torch.autograd.grad((out * weight).sum(), (q, k, v))
    want = torch.autograd.grad((m.reference(q, k, v, causal=causal) * weight).sum(), (q, k, v))
    for name, g, w in zip("qkv", got, want):
        assert bool(torch.isfinite(g).all()) and float(g.norm()) > 0, name
        assert rel_err(g, w) <= F64_GRAD_TOL, name


@pytest.mark.parametrize("case,_", params("stats"))
def test_stats_name_the_method_and_a_density(case, _, rng):
    m = case.make()
    q, k, v = case.inputs(rng)
    with torch.no_grad():
        out, stats = m(q, k, v, causal=first_flag(case), return_stats=True)
    assert isinstance(stats, CallStats) and out.shape == (2, 4, case.length, 8)
    assert stats.method == case.method
    assert 0 < stats.density <= 1


@pytest.mark.parametrize("case,causal", params("density", variants=lambda c: c.causal_flags))
def test_density_is_the_support_fraction(case, causal, rng):
    """Where the method has a sparse support, the stats' density is its share of the (causal,
    where causal) score matrix."""
    m = case.make()
    q, k, v = case.inputs(rng)
    with torch.no_grad():
        support = m.support(q, k, v, causal=causal)
        if support is None:
            return
        _, stats = m(q, k, v, causal=causal, return_stats=True)
    n = case.length
    area = n * (n + 1) / 2 if causal else n * n
    assert stats.density == pytest.approx(float(support.expand(2, 4, n, n).sum()) / (2 * 4 * area), rel=1e-6)


@pytest.mark.parametrize("case,_", params("determinism"))
def test_same_input_same_output(case, _, rng):
    """Two calls, and a second method with the same config, give bit-equal outputs and supports."""
    m, twin = case.make(), case.make()
    q, k, v = case.inputs(rng)
    causal = first_flag(case)
    with torch.no_grad():
        out = m(q, k, v, causal=causal)
        assert torch.equal(out, m(q, k, v, causal=causal))
        assert torch.equal(out, twin(q, k, v, causal=causal))
    support = m.support(q, k, v, causal=causal)
    assert (support is None) == (twin.support(q, k, v, causal=causal) is None)
    assert support is None or torch.equal(support, twin.support(q, k, v, causal=causal))


@pytest.mark.parametrize("case,_", params("support"))
def test_support_is_none_or_a_broadcastable_mask(case, _, rng):
    m = case.make()
    q, k, v = case.inputs(rng)
    with torch.no_grad():
        support = m.support(q, k, v, causal=first_flag(case))
    if support is None:
        return
    full = (2, 4, case.length, case.length)
    assert support.dtype == torch.bool
    assert torch.broadcast_shapes(support.shape, full) == full, tuple(support.shape)


@pytest.mark.parametrize("case,_", params("unknown_option"))
def test_unknown_option_is_refused(case, _):
    with pytest.raises(UnknownNameError, match="not_an_option"):
        case.make(not_an_option=1)


@pytest.mark.parametrize("case,option", params("bad_option", variants=lambda c: list(c.bad)))
def test_invalid_option_value_names_the_option(case, option, rng):
    """Checked when the method is made or, for checks that need the input's shape, at its first call."""
    q, k, v = case.inputs(rng)
    with pytest.raises(InvalidArgumentError) as err:
        case.make(**{option: case.bad[option]})(q, k, v, causal=first_flag(case))
    assert option in err.value.argument, str(err.value)


@pytest.mark.parametrize("case,_", params("check_finite"))
def test_non_finite_input_is_refused_unless_unchecked(case, _, rng):
    m = case.make()
    q, k, v = case.inputs(rng)
    q[0, 1, 2, 3] = float("nan")
    causal = first_flag(case)
    with torch.no_grad():
        with pytest.raises(InvalidArgumentError) as err:
            m(q, k, v, causal=causal)
        assert err.value.argument == "q", str(err.value)
        m(q, k, v, causal=causal, check_finite=False)
