"""The literal references (``methods/{dynamic,linear,learned}/naive.py``, what ``.reference`` runs)
import no fast-path code, only torch, math, the dense attention kernel and each other; and the
dynamic methods' defaults (budget rule at the call's length) agree with theirs."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch
from helpers import rel_err

import attnzoo
from attnzoo.methods.dynamic import naive as dynamic_naive
from attnzoo.methods.learned import naive as learned_naive
from attnzoo.methods.linear import naive as linear_naive

# what a literal reference may import: torch, math, the dense kernel (the final softmax on a
# support) and the other naive modules (reference code may share reference code, never fast-path code)
ALLOWED = {"torch", "math", "__future__:annotations", "...kernels.dense:masked_attention"}
SHARED = {"..linear.naive", "..dynamic.naive"}


@pytest.mark.parametrize("module", [dynamic_naive, linear_naive, learned_naive], ids=lambda m: m.__name__)
def test_the_literal_references_import_no_fast_path_code(module):
    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            source = f"{'.' * node.level}{node.module}"
            if source not in SHARED:
                imported |= {f"{source}:{alias.name}" for alias in node.names}
    assert imported <= ALLOWED, imported


def test_one_performer_feature_map_and_one_head_expansion():
    """SEA's estimate and performer's reference use the same positive random features, and every
    naive module the same grouped-query expansion (no twins)."""
    assert dynamic_naive.positive_random_features is linear_naive.positive_random_features
    assert learned_naive.expand_heads is linear_naive.expand_heads is dynamic_naive.expand_heads


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
