"""MInference vertical-slash against its literal reference estimate and selection, and the wrong rules it must catch."""

from __future__ import annotations

import pytest
import torch
from fidelity.dynamic.checks import assert_matches_reference, lowest_scored, mutant_test
from fidelity.mutation import Mutant

from attnzoo.methods.dynamic import vertical_slash

SHAPES = [(1, 2, 2, 96, 96, 8, True), (2, 4, 2, 96, 96, 8, True), (1, 2, 1, 64, 96, 8, True)]
CONFIGS = [
    dict(vertical_blocks=2, slash_blocks=3, block_size=16, local_blocks=1, last_q=16, vertical_columns=0,
         estimate_queries="last"),  # the paper's (the default spreads them)
    dict(vertical_blocks=1, slash_blocks=2, block_size=8, local_blocks=0, last_q=24, vertical_columns=5, estimate_queries="last"),
    dict(vertical_blocks=2, slash_blocks=3, block_size=16, local_blocks=1, last_q=7, vertical_columns=0, estimate_queries="spread"),
    dict(vertical_blocks=1, slash_blocks=2, block_size=8, local_blocks=0, last_q=12, vertical_columns=9, last_columns=4,
         estimate_queries="spread"),  # the default's shape: late columns from the last queries
]


def check(config: dict, seed: int) -> None:
    assert_matches_reference("vertical_slash", config, seed, SHAPES)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_selection_is_the_papers(config, rng):
    check(config, rng.initial_seed())


_estimate = vertical_slash.VerticalSlash.estimate


def _slash_scores_replaced(self, q, k, call):
    """The vertical scores stand in for the slash scores (offset j read as key j)."""
    vertical, _ = _estimate(self, q, k, call)
    return vertical, vertical.clone()


_positions = vertical_slash.VerticalSlash.query_positions


def _late_columns_from_the_spread_estimate(self, call, n, last):
    """The late columns read queries spread over the sequence, as the other columns do."""
    return _positions(self, call, n, False)


MUTANTS = [
    Mutant("vertical_slash-slash-scores-replaced", vertical_slash.VerticalSlash, "estimate", _slash_scores_replaced),
    Mutant("vertical_slash-lowest-scored", vertical_slash, "top_blocks", lowest_scored),
]
LATE_MUTANTS = [
    Mutant("vertical_slash-late-columns-spread", vertical_slash.VerticalSlash, "query_positions", _late_columns_from_the_spread_estimate),
    Mutant("vertical_slash-no-late-columns", vertical_slash.VerticalSlash, "late_columns",
           lambda self, q, k, call, outside, chosen, count: torch.full((*chosen.shape[:-1], count), -1, dtype=torch.long)),
]

test_mutant_is_caught = mutant_test(MUTANTS, lambda seed: check(CONFIGS[0], seed))
test_late_mutant_is_caught = mutant_test(LATE_MUTANTS, lambda seed: check(CONFIGS[3], seed))
