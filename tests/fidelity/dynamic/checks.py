"""The comparison every dynamic fidelity test runs: the method's output on random float64 inputs
(self and cross attention, grouped heads, causal and not) against its ``.reference``, exact
attention on the support that the literal selection written from the paper chose
(``attnzoo/methods/dynamic/naive.py``; ``s2``'s ``reference_mask``), no selection code shared with
the fast path."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from fidelity.mutation import Mutant, assert_caught
from helpers import rel_err

import attnzoo
from attnzoo.methods.dynamic.scoring import top_blocks

# (B, Hq, Hkv, Nq, Nk, D, causal)
SHAPES = [(1, 2, 2, 96, 96, 8, True), (2, 4, 2, 96, 96, 8, False), (1, 2, 1, 64, 96, 8, True)]


def assert_matches_reference(name: str, config: dict, seed: int, shapes=SHAPES, tol: float = 1e-9) -> None:
    """``attnzoo.get_method(name, **config)`` agrees with its ``.reference`` for every shape (inputs
    drawn from ``seed``)."""
    method = attnzoo.get_method(name, **config)
    gen = torch.Generator().manual_seed(seed)
    for B, Hq, Hkv, nq, nk, D, causal in shapes:
        q = torch.randn(B, Hq, nq, D, generator=gen, dtype=torch.float64)
        k = torch.randn(B, Hkv, nk, D, generator=gen, dtype=torch.float64)
        v = torch.randn(B, Hkv, nk, D, generator=gen, dtype=torch.float64)
        scale = D ** -0.5
        out = method(q, k, v, causal=causal, scale=scale)
        err = rel_err(out, method.reference(q, k, v, causal=causal, scale=scale))
        assert err <= tol, f"{name} {config} shape {(B, Hq, Hkv, nq, nk, D)} causal={causal} seed={seed}: error {err:.2e}"


def lowest_scored(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A wrong top-k for mutants: the ``count`` lowest finite scores (where -inf stays excluded)."""
    return top_blocks(torch.where(torch.isfinite(scores), -scores, scores), count)


def row_strips(grid, n_win, device) -> torch.Tensor:
    """A wrong region order for mutants: runs of the row-major order instead of 2-D windows."""
    return torch.arange(torch.Size(grid).numel(), device=device)


def mutant_test(mutants: list[Mutant], check: Callable[[int], None]):
    """The test a fidelity file exports as ``test_mutant_is_caught``: for every mutant, ``check(seed)``
    passes unmutated and fails with the mutant applied (:func:`fidelity.mutation.assert_caught`)."""

    @pytest.mark.parametrize("mutant", mutants, ids=lambda m: m.name)
    def test_mutant_is_caught(mutant, monkeypatch, rng):
        assert_caught(monkeypatch, mutant, lambda: check(rng.initial_seed()))

    return test_mutant_is_caught
