"""`performer` (FAVOR+, arXiv 2009.14794, Lemma 1 / Eq. 7) against its ``.reference``
(``methods/linear/naive.py``): ``W_ij = phi(q_i) . phi(k_j) / sum_s phi(q_i) . phi(k_s)`` with the
positive random features ``phi(x) = exp(w x - |x|^2 / 2) / sqrt(M)`` of ``x scale^(1/2)``, written
out here without stabilisers (float64 holds them). The projection w is the method's seeded draw."""

from __future__ import annotations

import torch
from fidelity.mutation import Mutant
from fidelity.quadratic import assert_matches, fidelity_tests

import attnzoo
from attnzoo.kernels.linear.feature_maps import favor_features
from attnzoo.methods.linear import performer as performer_module

NUM_FEATURES = 32


def check(gen):
    m = attnzoo.get_method("performer", num_features=NUM_FEATURES, chunk=16, seed=3)
    for causal in (False, True):
        assert_matches(m, m.reference, gen, causal=causal, label="performer")


def features_without_norm_term(x, proj, *, is_query):
    """The review's mutant: exp(w x) with the stabilisers, the -|x|^2 / 2 term dropped."""
    wx = x @ proj.to(x).transpose(-1, -2)
    stab = wx.amax(-1, keepdim=True) if is_query else wx.amax(dim=(-2, -1), keepdim=True)
    return torch.exp(wx - stab.detach())


def per_key_stabiliser(x, proj, *, is_query):
    """Keys stabilised by their own max, a factor per key that no longer cancels."""
    return favor_features(x, proj, is_query=True)


def unscaled_features(self, q, k, call):
    proj = self.projection(call.dim)
    return favor_features(q, proj, is_query=True), favor_features(k, proj, is_query=False)


MUTANTS = [
    Mutant("no-|x|^2/2-term", performer_module, "favor_features", features_without_norm_term),
    Mutant("per-key-stabiliser", performer_module, "favor_features", per_key_stabiliser),
    Mutant("scale-not-applied", performer_module.Performer, "features", unscaled_features),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
