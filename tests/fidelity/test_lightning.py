"""`lightning` (Lightning Attention, arXiv 2405.17381 / 2401.04658) against its ``.reference``
(``methods/linear/naive.py``): the unnormalised ``O = [(Q K^T) * M] V`` with ``M_ij =
lambda_h^(i-j)`` on keys j <= i (TransNormerLLM's ALiBi rates ``lambda_h = exp(-2^(-8 (h+1) / H))``,
or given factors), and ``Q (K^T V)`` without causality."""

from __future__ import annotations

from fidelity.mutation import Mutant
from fidelity.quadratic import assert_matches, fidelity_tests

import attnzoo
from attnzoo.methods.linear import lightning as lightning_module


def check(gen):
    for decay in ("alibi", (0.5, 0.9, 0.99, 1.0)):
        m = attnzoo.get_method("lightning", decay=decay, chunk=16)
        assert_matches(m, m.reference, gen, causal=True, label=f"lightning decay={decay}", Hq=4)
        assert_matches(m, m.reference, gen, causal=True, label=f"lightning decay={decay} cross", Hq=4, Nq=24, Nk=40)
    m = attnzoo.get_method("lightning", chunk=16)
    assert_matches(m, m.reference, gen, causal=False, label="lightning")


def _flipped(original):
    return lambda value, call, *args: None if value is None else original(value, call, *args).flip(0)


MUTANTS = [
    Mutant("decay-dropped", lightning_module.Lightning, "decay", lambda self, call: None),
    Mutant("decay-heads-reversed", lightning_module, "decay_for", _flipped(lightning_module.decay_for)),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
