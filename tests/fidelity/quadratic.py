"""The comparison of a linear or learned method with an N x N weight matrix written from its paper.

Each fidelity test file compares the method's fast path, forward and gradients in float64
(:func:`assert_matches`), with the (B, Hq, Nq, Nk) weight matrix ``W`` of its paper times v: its
``.reference`` where that is the literal one (``methods/linear/naive.py``,
``methods/learned/naive.py``), otherwise one the file builds from the pieces here (feature maps,
masks and normalisers written out). No reference calls a method's ``features()`` or the linear
executors; the only thing read from a method is its random draw or its parameters (a projection,
a rotation, a learned map), which are state rather than rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from fidelity.mutation import Mutant, assert_caught

SHAPE = dict(B=2, Hq=4, Hkv=2, Nq=40, D=8, Dv=6)  # 40 tokens: more than two chunks of 16
SCALE = 0.4  # not the default 1/sqrt(D), so a method that drops the caller's scale is caught
FORWARD_TOL = 1e-9  # float64 on both sides: only the order of summation differs
GRAD_TOL = 1e-8


def expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, N, E) -> (B, heads, N, E): query head h reads key/value head h // (heads / Hkv)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def visible(len_q: int, len_kv: int, causal: bool) -> torch.Tensor:
    """(Nq, Nk) bool: key j is visible to query i (causal: j <= i + Nk - Nq, queries aligned to
    the end of the keys)."""
    i = torch.arange(len_q)[:, None] + (len_kv - len_q)
    j = torch.arange(len_kv)[None, :]
    return (j <= i) if causal else torch.ones(len_q, len_kv, dtype=torch.bool)


def row_normalized(weights: torch.Tensor, eps: float) -> torch.Tensor:
    """Each row divided by its sum plus ``eps`` (Katharopoulos et al.'s normaliser)."""
    return weights / (weights.sum(-1, keepdim=True) + eps)


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1``: x + 1 for x > 0, exp(x) otherwise."""
    return torch.where(x > 0, x + 1, torch.exp(x))


def inputs(gen: torch.Generator, **shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) that require grad."""
    s = {**SHAPE, **shape}
    nk = s.get("Nk", s["Nq"])
    q = torch.randn(s["B"], s["Hq"], s["Nq"], s["D"], generator=gen, dtype=torch.float64)
    k = torch.randn(s["B"], s["Hkv"], nk, s["D"], generator=gen, dtype=torch.float64)
    v = torch.randn(s["B"], s["Hkv"], nk, s["Dv"], generator=gen, dtype=torch.float64)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def assert_matches(method, reference: Callable[..., torch.Tensor], gen: torch.Generator, *, causal: bool,
                   label: str, scale: float = SCALE, forward_tol: float = FORWARD_TOL, grad_tol: float = GRAD_TOL,
                   **shape) -> None:
    """On fresh float64 inputs of ``shape`` (see :data:`SHAPE`), ``method(q, k, v)`` equals
    ``reference(q, k, v, causal=, scale=)`` (both (B, Hq, Nq, Dv)) to ``forward_tol`` relative
    error, and so do the gradients of q, k, v under a random weighting of the output."""
    q, k, v = inputs(gen, **shape)
    got, want = method(q, k, v, causal=causal, scale=scale), reference(q, k, v, causal=causal, scale=scale)
    label = f"{label} (causal={causal}, seed {gen.initial_seed()})"
    err = float((got.detach().double() - want.detach()).norm() / want.detach().norm().clamp_min(1e-300))
    assert err <= forward_tol, f"{label}: forward relative error {err:.3g} > {forward_tol:g}"
    weight = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    got_grads = torch.autograd.grad((got * weight).sum(), (q, k, v), allow_unused=True)
    want_grads = torch.autograd.grad((want * weight).sum(), (q, k, v), allow_unused=True)
    for name, x, g, w in zip("qkv", (q, k, v), got_grads, want_grads):
        g, w = (torch.zeros_like(x) if t is None else t for t in (g, w))
        gerr = float((g - w).norm() / w.norm().clamp_min(1e-300))
        assert gerr <= grad_tol, f"{label}: d{name} relative error {gerr:.3g} > {grad_tol:g}"


def fidelity_tests(check: Callable[[torch.Generator], None], mutants: Sequence[Mutant]):
    """The two tests of a fidelity file: ``check(gen)`` (the fast path against the quadratic
    reference) passes, and fails under every mutant. Assign them to ``test_*`` names."""

    def test_matches_quadratic_reference(rng):
        check(rng)

    @pytest.mark.parametrize("mutant", mutants, ids=lambda m: m.name)
    def test_mutant_is_caught(mutant, monkeypatch, rng):
        assert_caught(monkeypatch, mutant, lambda: check(rng))

    return test_matches_quadratic_reference, test_mutant_is_caught
