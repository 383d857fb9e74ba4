"""`inline` (arXiv 2412.06590, Eq. 5 with the official code's scale / N) against its ``.reference``
(``methods/linear/naive.py``): ``W_ij = (scale / n_i) (phi(q_i) . phi(k_j) - (1/n_i) sum_s phi(q_i)
. phi(k_s)) + 1 / n_i`` over the n_i visible keys, plus the local residual: softmax attention over
the ``window`` keys around the query (centred; the most recent when causal)."""

from __future__ import annotations

from fidelity.mutation import Mutant
from fidelity.quadratic import assert_matches, fidelity_tests

import attnzoo
from attnzoo.methods.linear import inline as inline_module

InLine = inline_module.InLine
INLINE = InLine._inline  # the unpatched term, for the mutant that wraps it


def check(gen):
    for cfg in (dict(), dict(feature_map="elu", window=0)):
        m = attnzoo.get_method("inline", chunk=16, **cfg)
        for causal in (False, True):
            assert_matches(m, m.reference, gen, causal=causal, label=f"inline {cfg}")
        assert_matches(m, m.reference, gen, causal=True, label=f"inline {cfg} cross", Nq=24, Nk=40)


def without_scale_over_n(self, q, k, v, call, product):
    """The review's finding: the injective term without scale / n (queries scaled by n / scale,
    which undoes the factor for the linear feature maps; elu + 1 is changed too)."""
    return INLINE(self, q * (InLine._visible(call, q) / call.scale).to(q.dtype), k, v, call, product)


MUTANTS = [
    Mutant("no-scale-over-n", InLine, "_inline", without_scale_over_n),
    Mutant("no-local-residual", InLine, "_with_local", lambda self, out, q, k, v, call: out.to(q.dtype)),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
