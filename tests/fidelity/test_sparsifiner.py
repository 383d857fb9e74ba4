"""`sparsifiner` (arXiv 2303.13755, Sec. 3) against its definition written out: the connectivity
logits ``(q W_q) (k W_k)^T / sqrt(r)`` of a perturbed low-rank predictor, each query's
``ceil(density N)`` best keys by those logits, exact softmax attention over them only."""

from __future__ import annotations

import math

import torch
from fidelity.mutation import Mutant
from fidelity.quadratic import assert_matches, expand_heads, fidelity_tests

import attnzoo
from attnzoo.methods.learned.sparsifiner import ConnectivityPredictor, Sparsifiner

DENSITY, RANK = 0.3, 3


def check(gen):
    m = attnzoo.get_method("sparsifiner", density=DENSITY, rank=RANK)
    m.materialize(4, 2, 8, 6)
    with torch.no_grad():
        for p in m.predictor.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    wq, wk = (w.detach().double() for w in (m.predictor.query, m.predictor.key))

    def reference(q, k, v, *, causal, scale):
        assert not causal
        k, v = expand_heads(k, q.shape[1]), expand_heads(v, q.shape[1])
        connectivity = (q.detach() @ wq) @ (k.detach() @ wk).transpose(-1, -2) / math.sqrt(RANK)
        kept = connectivity.topk(math.ceil(DENSITY * k.shape[2]), dim=-1).indices
        allowed = torch.zeros(connectivity.shape, dtype=torch.bool).scatter_(-1, kept, True)
        logits = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf)
        return torch.softmax(logits, -1) @ v

    assert_matches(m, reference, gen, causal=False, label="sparsifiner")


MUTANTS = [
    Mutant("lowest-predicted-keys", ConnectivityPredictor, "forward",
           lambda self, q, k: -(q.double() @ self.query.double()) @ (k.double() @ self.key.double()).transpose(-1, -2)),
    Mutant("one-key-short", Sparsifiner, "keep", lambda self, call: max(1, math.ceil(self.config.density * call.len_kv) - 1)),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
