"""`lightning` (Lightning Attention, arXiv 2405.17381 / 2401.04658) against the unnormalised ``O =
[(Q K^T) * M] V`` with ``M_ij = lambda_h^(i-j)`` on keys j <= i (TransNormerLLM's ALiBi rates
``lambda_h = exp(-2^(-8 (h+1) / H))``, or given factors), and ``Q (K^T V)`` without causality."""

from __future__ import annotations

import torch
from fidelity.mutation import Mutant
from fidelity.quadratic import (
    assert_matches,
    distance,
    expand_heads,
    fidelity_tests,
    visible,
)

import attnzoo
from attnzoo.methods.linear import lightning as lightning_module


def alibi(heads: int) -> torch.Tensor:
    return torch.exp(-(2.0 ** (-8.0 * torch.arange(1, heads + 1, dtype=torch.float64) / heads)))


def reference(q, k, v, *, causal, scale, rates=None):
    heads = q.shape[1]
    scores = q @ expand_heads(k, heads).transpose(-1, -2)
    if causal:
        dist = distance(q.shape[2], k.shape[2])
        scores = scores * torch.where(visible(q.shape[2], k.shape[2], True), rates[:, None, None] ** dist.clamp(min=0), 0.0)
    return scores @ expand_heads(v, heads)


def check(gen):
    heads = 4
    cases = [("alibi", alibi(heads)), ((0.5, 0.9, 0.99, 1.0), torch.tensor([0.5, 0.9, 0.99, 1.0], dtype=torch.float64))]
    for decay, rates in cases:
        m = attnzoo.get_method("lightning", decay=decay, chunk=16)
        ref = lambda q, k, v, rates=rates, **kw: reference(q, k, v, rates=rates, **kw)  # noqa: E731
        assert_matches(m, ref, gen, causal=True, label=f"lightning decay={decay}", Hq=heads)
        assert_matches(m, ref, gen, causal=True, label=f"lightning decay={decay} cross", Hq=heads, Nq=24, Nk=40)
    assert_matches(attnzoo.get_method("lightning", chunk=16), reference, gen, causal=False, label="lightning")


def _flipped(original):
    return lambda value, call, *args: None if value is None else original(value, call, *args).flip(0)


MUTANTS = [
    Mutant("decay-dropped", lightning_module.Lightning, "decay", lambda self, call: None),
    Mutant("decay-heads-reversed", lightning_module, "decay_for", _flipped(lightning_module.decay_for)),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
