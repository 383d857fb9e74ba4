"""`rala` (arXiv 2411.07635, Eq. 10-11 and qhfan/RALA) against its ``.reference``
(``methods/linear/naive.py``): ``W_ij = phi(q_i) . alpha_j phi(k_j) / sum_s phi(q_i) . alpha_s
phi(k_s)`` with phi = elu + 1 and the query-aware key weights ``alpha_j = Nk softmax_j(scale mean_i
phi(q_i) . phi(k_j))`` computed on the features."""

from __future__ import annotations

import torch
from fidelity.mutation import Mutant
from fidelity.quadratic import assert_matches, fidelity_tests

import attnzoo
from attnzoo.methods.linear import rala as rala_module


def check(gen):
    m = attnzoo.get_method("rala")
    assert_matches(m, m.reference, gen, causal=False, label="rala")
    assert_matches(m, m.reference, gen, causal=False, label="rala cross", Nq=24, Nk=40)


def alpha_from_raw_inputs(self, q, k, call):
    """The review's finding: alpha computed from q, k before the feature map."""
    phi = rala_module.fixed_map(self.config.feature_map)
    k_heads = rala_module.repeat_kv(k, call.groups)
    alpha = call.len_kv * torch.softmax(q.mean(2, keepdim=True) @ k_heads.transpose(-1, -2) * call.scale, dim=-1)
    return phi(q), rala_module.repeat_kv(phi(k), call.groups) * alpha.transpose(-1, -2)


MUTANTS = [
    Mutant("alpha-one", rala_module.RALA, "key_weights", lambda self, qf, kf, call: torch.ones_like(kf[..., :1])),
    Mutant("alpha-from-raw-q-k", rala_module.RALA, "features", alpha_from_raw_inputs),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
