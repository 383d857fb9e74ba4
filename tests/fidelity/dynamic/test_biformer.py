"""BiFormer's region routing against its literal reference, on 2-D and 1-D grids, and the wrong rules it must catch."""

from __future__ import annotations

import pytest
from fidelity.dynamic.checks import (
    assert_matches_reference,
    lowest_scored,
    mutant_test,
    row_strips,
)
from fidelity.mutation import Mutant

from attnzoo.methods.dynamic import biformer

SHAPES = [(2, 4, 2, 96, 96, 8, False), (1, 2, 2, 96, 96, 8, False)]
CONFIGS = [dict(n_win=4, topk=3, grid=(8, 12)), dict(n_win=6, topk=2, grid=None)]


def check(config: dict, seed: int) -> None:
    assert_matches_reference("biformer", config, seed, SHAPES)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_selection_is_the_papers(config, rng):
    check(config, rng.initial_seed())


MUTANTS = [
    Mutant("biformer-least-similar-regions", biformer, "top_blocks", lowest_scored),
    Mutant("biformer-row-strip-regions", biformer, "region_order", row_strips),
]

test_mutant_is_caught = mutant_test(MUTANTS, lambda seed: check(CONFIGS[0], seed))
