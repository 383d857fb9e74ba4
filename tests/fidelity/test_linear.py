"""`linear` (Katharopoulos et al., arXiv 2006.16236, Eq. 4-6) against its ``.reference``
(``methods/linear/naive.py``): ``W_ij = phi(q_i) . phi(k_j) / (sum_s phi(q_i) . phi(k_s) + eps)``
over the visible keys, with phi = elu + 1 and relu."""

from __future__ import annotations

import torch.nn.functional as F
from fidelity.mutation import Mutant
from fidelity.quadratic import assert_matches, fidelity_tests

import attnzoo
from attnzoo.kernels.linear.feature_maps import fixed_map
from attnzoo.methods.linear import base as base_module
from attnzoo.methods.linear import linear as linear_module


def check(gen):
    for name in ("elu", "relu"):
        m = attnzoo.get_method("linear", feature_map=name, chunk=16)
        for causal in (False, True):
            assert_matches(m, m.reference, gen, causal=causal, label=f"linear {name}")
        assert_matches(m, m.reference, gen, causal=True, label=f"linear {name} cross", Nq=24, Nk=40)


def _without_causal(original):
    return lambda *args, causal, **kw: original(*args, causal=False, **kw)


MUTANTS = [
    Mutant("elu-without-plus-one", linear_module, "fixed_map", lambda name: F.elu if name == "elu" else fixed_map(name)),
    Mutant("rows-not-normalised", linear_module.Linear, "normalize", False),
    Mutant("causal-ignored", base_module, "linear_attention", _without_causal(base_module.linear_attention)),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
