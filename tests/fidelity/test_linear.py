"""`linear` (Katharopoulos et al., arXiv 2006.16236, Eq. 4-6) against ``W_ij = phi(q_i) . phi(k_j)
/ (sum_s phi(q_i) . phi(k_s) + eps)`` over the visible keys, with phi = elu + 1 and relu."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fidelity.mutation import Mutant
from fidelity.quadratic import (
    assert_matches,
    elu_plus_one,
    expand_heads,
    fidelity_tests,
    row_normalized,
    visible,
)

import attnzoo
from attnzoo.kernels.linear.feature_maps import fixed_map
from attnzoo.methods.linear import base as base_module
from attnzoo.methods.linear import linear as linear_module

MAPS = {"elu": elu_plus_one, "relu": torch.relu}


def reference(q, k, v, *, causal, scale, phi):
    heads = q.shape[1]
    weights = (phi(q) @ phi(expand_heads(k, heads)).transpose(-1, -2)) * visible(q.shape[2], k.shape[2], causal)
    return row_normalized(weights, 1e-6) @ expand_heads(v, heads)


def check(gen):
    for name, phi in MAPS.items():
        m = attnzoo.get_method("linear", feature_map=name, chunk=16)
        ref = lambda q, k, v, phi=phi, **kw: reference(q, k, v, phi=phi, **kw)  # noqa: E731
        for causal in (False, True):
            assert_matches(m, ref, gen, causal=causal, label=f"linear {name}")
        assert_matches(m, ref, gen, causal=True, label=f"linear {name} cross", Nq=24, Nk=40)


def _without_causal(original):
    return lambda *args, causal, **kw: original(*args, causal=False, **kw)


MUTANTS = [
    Mutant("elu-without-plus-one", linear_module, "fixed_map", lambda name: F.elu if name == "elu" else fixed_map(name)),
    Mutant("rows-not-normalised", linear_module.Linear, "normalize", False),
    Mutant("causal-ignored", base_module, "linear_attention", _without_causal(base_module.linear_attention)),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
