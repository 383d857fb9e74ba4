"""`linfusion` (arXiv 2409.02097, Eq. 6-7) against the normalisation-aware, non-causal ``W_ij =
phi_q(q_i) . phi_k(k_j) / sum_s phi_q(q_i) . phi_k(k_s)`` with the learnable kernel ``phi(x) =
elu(x + W_2 gelu(W_1 x + b_1) + b_2) + 1`` per head, separate MLPs for queries and keys, read
from a perturbed map."""

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
)

import attnzoo
from attnzoo.methods.learned.maps import KernelMLP


def kernel(x, layers):
    hidden = F.gelu(x @ layers[0].weight.double() + layers[0].bias.double())
    return elu_plus_one(x + hidden @ layers[1].weight.double() + layers[1].bias.double())


def check(gen):
    m = attnzoo.get_method("linfusion", width=5)
    m.materialize(4, 2, 8, 6)
    with torch.no_grad():
        for p in m.feature_map.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    fmap = m.feature_map

    def reference(q, k, v, *, causal, scale):
        assert not causal
        heads = q.shape[1]
        weights = kernel(q, fmap.query) @ kernel(expand_heads(k, heads), fmap.key).transpose(-1, -2)
        return row_normalized(weights, 1e-6) @ expand_heads(v, heads)

    assert_matches(m, reference, gen, causal=False, label="linfusion")
    assert_matches(m, reference, gen, causal=False, label="linfusion cross", Nq=24, Nk=40)


MUTANTS = [
    Mutant("mlp-residual-dropped", KernelMLP, "_map", staticmethod(lambda layers, x: F.elu(x) + 1)),
    Mutant("keys-through-query-mlp", KernelMLP, "forward", lambda self, q, k: (self._map(self.query, q), self._map(self.query, k))),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
