"""`random_feature` (arXiv 2307.11353, Eq. 3) against ``O_i = sum_m sum_j a^m_ij v_j V_m`` with
``a^m_ij = relu(q_i W_m k_j scale) / n_i`` over the n_i visible keys (or a softmax over them), the
frozen ``W_m = mean I + std G_m`` (G_m i.i.d. standard normal, drawn from ``seed``) and given value
matrices V_m; one loop over the heads m."""

from __future__ import annotations

import torch
from fidelity.mutation import Mutant
from fidelity.quadratic import assert_matches, expand_heads, fidelity_tests, visible

import attnzoo
from attnzoo.methods.learned import random_feature as random_feature_module

RandomFeature = random_feature_module.RandomFeature
HEADS, MEAN, STD, SEED = 3, 0.5, 0.7, 4


def reference(q, k, v, *, causal, scale, values, activation):
    heads, dim = q.shape[1], q.shape[-1]
    noise = torch.randn(HEADS, dim, dim, generator=torch.Generator().manual_seed(SEED))
    query_key = (MEAN * torch.eye(dim) + STD * noise).double()
    k, v = expand_heads(k, heads), expand_heads(v, heads)
    seen = visible(q.shape[2], k.shape[2], causal)
    out = 0.0
    for m in range(HEADS):
        logits = (q @ query_key[m] @ k.transpose(-1, -2)) * scale
        if activation == "relu":
            weights = torch.relu(logits) * seen / seen.sum(-1, keepdim=True).clamp_min(1)
        else:
            weights = torch.softmax(logits.masked_fill(~seen, float("-inf")), dim=-1)
        out = out + weights @ v @ values[m]
    return out


def check(gen):
    values = torch.randn(HEADS, 6, 6, generator=gen, dtype=torch.float64)
    for activation, causal in (("relu", False), ("relu", True), ("softmax", True)):
        m = attnzoo.get_method("random_feature", num_heads=HEADS, mean=MEAN, std=STD, seed=SEED, activation=activation,
                               query_block=16, values=values)
        ref = lambda q, k, v, activation=activation, **kw: reference(q, k, v, values=values, activation=activation, **kw)  # noqa: E731
        assert_matches(m, ref, gen, causal=causal, label=f"random_feature {activation}")


QUERY_KEY, VALUES = RandomFeature.query_key, RandomFeature.value_matrices

MUTANTS = [
    Mutant("query-key-transposed", RandomFeature, "query_key", lambda self, dim: QUERY_KEY(self, dim).transpose(-1, -2)),
    Mutant("values-transposed", RandomFeature, "value_matrices", lambda self, *a: VALUES(self, *a).transpose(-1, -2)),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
