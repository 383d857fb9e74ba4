"""`scatterbrain` (arXiv 2110.15343, Eq. 2) against ``W_ij = exp(q_i . k_j scale)`` on the LSH set
and ``phi(q_i) . phi(k_j)`` (Performer features, ``exp(w x - |x|^2 / 2) / sqrt(M)`` of ``x
scale^(1/2)``) elsewhere, rows normalised. The LSH set, written with loops: a token's bucket is the
argmax of ``[x R, -x R]``; queries and keys are each sorted by (bucket, position) and cut into
chunks of ``bucket_chunk``; a pair is in the set when it shares bucket and chunk. The projection
w and rotation R are the method's seeded draws."""

from __future__ import annotations

import torch
from fidelity.mutation import Mutant
from fidelity.quadratic import (
    assert_matches,
    expand_heads,
    fidelity_tests,
    positive_random_features,
    row_normalized,
    visible,
)

import attnzoo
from attnzoo.methods.linear import scatterbrain as scatterbrain_module

CHUNK = 8


def buckets_and_chunks(x, rotation):
    """Per (b, h, token): its angular-LSH bucket and the chunk it falls in after sorting."""
    proj = x.detach() @ rotation.double()
    bucket = torch.cat([proj, -proj], dim=-1).argmax(-1)
    chunk = torch.empty_like(bucket)
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            order = sorted(range(x.shape[2]), key=lambda i: (int(bucket[b, h, i]), i))
            for rank, i in enumerate(order):
                chunk[b, h, i] = rank // CHUNK
    return bucket, chunk


def check(gen):
    m = attnzoo.get_method("scatterbrain", num_features=16, num_buckets=4, bucket_chunk=CHUNK, chunk=16, seed=2)

    def reference(q, k, v, *, causal, scale):
        heads = q.shape[1]
        proj, rotation = (d.double() for d in m.draws(q.shape[-1]))
        k, v = expand_heads(k, heads), expand_heads(v, heads)
        (bq, cq), (bk, ck) = buckets_and_chunks(q, rotation), buckets_and_chunks(k, rotation)
        in_set = (bq[..., :, None] == bk[..., None, :]) & (cq[..., :, None] == ck[..., None, :])
        low_rank = positive_random_features(q, proj, scale) @ positive_random_features(k, proj, scale).transpose(-1, -2)
        weights = torch.where(in_set, torch.exp(q @ k.transpose(-1, -2) * scale), low_rank)
        return row_normalized(weights * visible(q.shape[2], k.shape[2], causal), 0.0) @ v

    for causal in (False, True):
        assert_matches(m, reference, gen, causal=causal, label="scatterbrain")


def exponent_without_norm_term(x, proj, *, is_query):
    wx = x @ proj.to(x).transpose(-1, -2)
    stab = wx.amax(-1, keepdim=True) if is_query else wx.amax(dim=(-2, -1), keepdim=True)
    return wx, stab.detach()


MUTANTS = [
    Mutant("no-sparse-correction", scatterbrain_module.Scatterbrain, "_correction", lambda self, q, k, v, call: 0.0),
    Mutant("no-|x|^2/2-term", scatterbrain_module, "favor_exponent", exponent_without_norm_term),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
