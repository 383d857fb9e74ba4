"""`scatterbrain` (arXiv 2110.15343, Eq. 2) against its ``.reference`` (``methods/linear/naive.py``):
``W = phi(Q) phi(K)^T + S``, Performer features ``exp(w x - |x|^2 / 2) / sqrt(M)`` of ``x scale^(1/2)``
and the sparse correction ``S_ij = exp(q_i . k_j scale) - phi(q_i) . phi(k_j)`` on the LSH set,
rows normalised. The LSH set, written with loops: a token's bucket is the argmax of ``[x R, -x R]``;
queries and keys are each sorted by (bucket, position) and cut into chunks of ``bucket_chunk``; a
pair is in the set when it shares bucket and chunk. The projection w and rotation R are the
method's seeded draws."""

from __future__ import annotations

from fidelity.mutation import Mutant
from fidelity.quadratic import assert_matches, fidelity_tests

import attnzoo
from attnzoo.methods.linear import scatterbrain as scatterbrain_module


def check(gen):
    m = attnzoo.get_method("scatterbrain", num_features=16, num_buckets=4, bucket_chunk=8, chunk=16, seed=2)
    for causal in (False, True):
        assert_matches(m, m.reference, gen, causal=causal, label="scatterbrain")
    exact = attnzoo.get_method("scatterbrain", num_features=16, num_buckets=1, bucket_chunk=64, chunk=16)
    assert_matches(exact, exact.reference, gen, causal=True, label="scatterbrain one bucket, one chunk")


def exponent_without_norm_term(x, proj, *, is_query):
    wx = x @ proj.to(x).transpose(-1, -2)
    stab = wx.amax(-1, keepdim=True) if is_query else wx.amax(dim=(-2, -1), keepdim=True)
    return wx, stab.detach()


MUTANTS = [
    Mutant("no-sparse-correction", scatterbrain_module.Scatterbrain, "_correction", lambda self, q, k, v, call: 0.0),
    Mutant("no-|x|^2/2-term", scatterbrain_module, "favor_exponent", exponent_without_norm_term),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
