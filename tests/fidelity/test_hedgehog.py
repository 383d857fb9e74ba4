"""`hedgehog` (arXiv 2402.04347, Eq. 4-5) against ``W_ij = phi_q(q_i) . phi_k(k_j) / sum_s
phi_q(q_i) . phi_k(k_s)`` with the spiky feature map ``phi(x) = [softmax(x W + b), softmax(-(x W +
b))]`` per head, separate (W, b) for queries and keys, read from a perturbed map."""

from __future__ import annotations

import torch
from fidelity.mutation import Mutant
from fidelity.quadratic import (
    assert_matches,
    expand_heads,
    fidelity_tests,
    row_normalized,
    visible,
)

import attnzoo
from attnzoo.methods.learned.maps import HedgehogFeatureMap


def spiky(x, layer):
    z = x @ layer.weight.double() + layer.bias.double()
    return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], dim=-1)


def check(gen):
    m = attnzoo.get_method("hedgehog", chunk=16, width=5)
    m.materialize(4, 2, 8, 6)
    with torch.no_grad():
        for p in m.feature_map.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    fmap = m.feature_map

    def reference(q, k, v, *, causal, scale):
        heads = q.shape[1]
        weights = spiky(q, fmap.query) @ spiky(expand_heads(k, heads), fmap.key).transpose(-1, -2)
        return row_normalized(weights * visible(q.shape[2], k.shape[2], causal), 1e-6) @ expand_heads(v, heads)

    for causal in (False, True):
        assert_matches(m, reference, gen, causal=causal, label="hedgehog")


MUTANTS = [
    Mutant("no-negative-half", HedgehogFeatureMap, "_map", staticmethod(lambda x: torch.cat([torch.softmax(x, -1)] * 2, -1))),
    Mutant("keys-through-query-map", HedgehogFeatureMap, "forward", lambda self, q, k: (self._map(self.query(q)), self._map(self.query(k)))),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
