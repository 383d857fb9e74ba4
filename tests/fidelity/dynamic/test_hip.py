"""HiP's tree search against its literal reference, per branch score, and the wrong rules it must catch."""

from __future__ import annotations

import pytest
from fidelity.dynamic.checks import assert_matches_reference, mutant_test
from fidelity.mutation import Mutant

from attnzoo.methods.dynamic import hip
from attnzoo.methods.dynamic.scoring import listed_block_mass

CONFIGS = [
    dict(top_k=3, block_size=16, branch_score="paper"),
    dict(top_k=2, block_size=16, branch_score="paper", key_block_size=8, local_blocks=0),
    dict(top_k=3, block_size=16, branch_score="pooled"),
    dict(top_k=3, block_size=16, branch_score="bound"),
    dict(top_k=3, block_size=16, query_samples=3),
    dict(top_k=3, block_size=16, branch_score="bound", query_samples=2),
]
CONFIGS = [dict(c, candidates=1) for c in CONFIGS] + [  # the search alone, then re-ranking a shortlist (the default: 8 top_k)
    dict(top_k=2, block_size=16),
    dict(top_k=2, block_size=8, candidates=3, rerank_samples=2, branch_score="paper"),
]


def check(config: dict, seed: int) -> None:
    assert_matches_reference("hip", config, seed)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_selection_is_the_papers(config, rng):
    check(config, rng.initial_seed())


def test_the_default_without_query_samples_is_the_bound_and_with_them_the_paper():
    assert hip.HiP().config.branch_score == "bound"
    assert hip.HiP(query_samples=4).config.branch_score == "paper"


def _no_tree_search(qp, reach, score, bounds, top_k):
    """The first block of each initial range, no descent."""
    return bounds[:, :-1].expand(*qp.shape[:2], -1, -1)


def _least_mass(q, k, call, blocks, q_block, kv_block, samples):
    """The re-ranking keeps the shortlisted blocks with the least sampled attention mass."""
    return -listed_block_mass(q, k, call, blocks, q_block, kv_block, samples)


MUTANTS = [
    Mutant("hip-no-tree-search", hip, "_search", _no_tree_search),
    Mutant("hip-first-block-represents", hip, "representative_block", lambda starts, ends: starts),
]
RERANK_MUTANTS = [Mutant("hip-rerank-least-mass", hip, "listed_block_mass", _least_mass)]

test_mutant_is_caught = mutant_test(MUTANTS, lambda seed: [check(config, seed) for config in CONFIGS[:2]])
test_rerank_mutant_is_caught = mutant_test(RERANK_MUTANTS, lambda seed: check(CONFIGS[-1], seed))
