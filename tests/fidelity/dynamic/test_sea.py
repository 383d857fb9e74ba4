"""SEA's estimated mask (its training-free, dynamic part) against a literal reference, and the wrong rules it must catch."""

from __future__ import annotations

import pytest
import torch
from fidelity.dynamic.checks import SHAPES, assert_matches_reference, mutant_test
from fidelity.mutation import Mutant

from attnzoo.kernels.linear.feature_maps import favor_exponent
from attnzoo.methods.dynamic import sea

CONFIGS = [dict(top_k=12, q_block=16, num_features=32, seed=0), dict(top_k=5, q_block=8, num_features=16, seed=2)]


def check(config: dict, seed: int) -> None:
    assert_matches_reference("sea", config, seed, SHAPES)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_estimated_mask_is_the_papers(config, rng):
    check(config, rng.initial_seed())


def _features_without_the_norm_term(x, proj, *, is_query):
    exponent, stab = favor_exponent(x, proj, is_query=is_query)
    return torch.exp(exponent + 0.5 * (x.to(exponent.dtype) ** 2).sum(-1, keepdim=True) - stab)


MUTANTS = [
    Mutant("sea-features-without-norm-term", sea, "favor_features", _features_without_the_norm_term),
    Mutant("sea-rows-not-normalised", sea, "_row_normaliser", lambda qf, kf, call: torch.ones(qf.shape[:3], dtype=qf.dtype)),
]

test_mutant_is_caught = mutant_test(MUTANTS, lambda seed: check(CONFIGS[0], seed))
