"""MInference block-sparse against its literal reference selection (``.reference``), and the wrong rules it must catch."""

from __future__ import annotations

import pytest
from fidelity.dynamic.checks import assert_matches_reference, lowest_scored, mutant_test
from fidelity.mutation import Mutant

from attnzoo.methods.dynamic import block_sparse
from attnzoo.methods.dynamic.scoring import pooled_scores

CONFIGS = [
    dict(top_k=3, block_size=16, local_blocks=1, estimator="pooled_qk"),  # the paper's (the default is sampled_q)
    dict(top_k=2, block_size=16, local_blocks=0, estimator="pooled_qk"),
    dict(top_k=3, block_size=16, local_blocks=1, estimator="sampled_q", samples=3),
]


def check(config: dict, seed: int) -> None:
    assert_matches_reference("block_sparse", config, seed)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_selection_is_the_papers(config, rng):
    check(config, rng.initial_seed())


def _scores_of_the_next_block(q, k, call, q_block, kv_block):
    return pooled_scores(q, k, call, q_block, kv_block).roll(1, -1)


MUTANTS = [
    Mutant("block_sparse-lowest-scored", block_sparse, "top_blocks", lowest_scored),
    Mutant("block_sparse-scores-shifted-one-block", block_sparse, "pooled_scores", _scores_of_the_next_block),
]

test_mutant_is_caught = mutant_test(MUTANTS, lambda seed: check(CONFIGS[0], seed))
