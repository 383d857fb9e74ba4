"""The dynamic methods' ``.reference`` is the literal selection of ``methods/dynamic/naive.py``: it
imports no selection code, and the defaults (budget rule at the call's length) agree with it."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch
from helpers import rel_err

import attnzoo
from attnzoo.methods.dynamic import naive


def test_the_literal_selections_import_no_selection_code():
    """Only torch, math and the dense attention kernel (for the final softmax on the support)."""
    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(naive))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f"{'.' * node.level}{node.module}:{alias.name}" for alias in node.names}
    assert imported <= {"torch", "math", "__future__:annotations", "...kernels.dense:masked_attention"}, imported


@pytest.mark.parametrize("name", ["block_sparse", "hip", "vertical_slash"])
def test_defaults_match_their_literal_reference(name, rng):
    """No options: at 1024 keys the rule gives 16-token blocks at 60% density, so the selection
    (hip's shortlist re-ranking included) chooses among many blocks."""
    q = torch.randn(1, 2, 1024, 16, generator=rng, dtype=torch.float64)
    k = torch.randn(1, 1, 1024, 16, generator=rng, dtype=torch.float64)
    v = torch.randn(1, 1, 1024, 16, generator=rng, dtype=torch.float64)
    method = attnzoo.get_method(name)
    out, stats = method(q, k, v, causal=True, return_stats=True)
    assert stats.density < 0.7, stats.density
    err = rel_err(out, method.reference(q, k, v, causal=True))
    assert err <= 1e-9, f"{name} defaults, seed {rng.initial_seed()}: error {err:.2e}"
