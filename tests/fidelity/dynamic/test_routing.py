"""Routing attention's balanced k-means clusters against their literal reference, and the wrong rules it must catch."""

from __future__ import annotations

import pytest
import torch
from fidelity.dynamic.checks import SHAPES, assert_matches_reference, mutant_test
from fidelity.mutation import Mutant

import attnzoo
from attnzoo.methods.dynamic import routing

CONFIGS = [dict(num_clusters=3, iterations=2, seed=0, window=None), dict(num_clusters=4, iterations=1, seed=5, window=40)]
SMALL = [shape[:3] + (48, 48) + shape[5:] for shape in SHAPES[:2]]


def check(config: dict, seed: int) -> None:
    assert_matches_reference("routing", config | dict(block_size=16), seed, SMALL, tol=1e-6)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_clusters_are_the_papers(config, rng):
    check(config, rng.initial_seed())


def test_balanced_clusters_hold_window_tokens_each(rng):
    q, k = torch.randn(1, 2, 64, 8, generator=rng), torch.randn(1, 2, 64, 8, generator=rng)
    m = attnzoo.get_method("routing", num_clusters=4)
    q_ids, k_ids = m.members(q, k, m._prepare(q, k, k, False, None))
    assert q_ids.shape == k_ids.shape == (1, 2, 4, 16)
    assert all(len(set(ids.tolist())) == 16 for ids in q_ids.flatten(0, 2))


def _random_centroids(self, qn, kn):
    gen = torch.Generator().manual_seed(1)
    shape = (*qn.shape[:2], self.config.num_clusters, qn.shape[-1])
    return torch.nn.functional.normalize(torch.randn(shape, generator=gen), dim=-1)


def _random_seeds(self, tokens):
    """Starts at seeded random tokens instead of farthest-first."""
    start = torch.randperm(tokens.shape[2], generator=torch.Generator().manual_seed(self.config.seed))
    return tokens[:, :, start[: self.config.num_clusters]]


MUTANTS = [
    Mutant("routing-random-clusters", routing.Routing, "centroids", _random_centroids),
    Mutant("routing-random-starts", routing.Routing, "seeds", _random_seeds),
]

test_mutant_is_caught = mutant_test(MUTANTS, lambda seed: check(CONFIGS[0], seed))
