"""BiFormer's region routing against its literal reference, on 2-D and 1-D grids, and the wrong rules it must catch."""

from __future__ import annotations

import functools

import pytest
import torch
from fidelity.dynamic.checks import assert_matches_reference
from fidelity.dynamic.references import biformer_support
from fidelity.mutation import Mutant, assert_caught

from attnzoo.methods.dynamic import biformer
from attnzoo.methods.dynamic.scoring import top_blocks

SHAPES = [(2, 4, 2, 96, 96, 8, False), (1, 2, 2, 96, 96, 8, False)]
CONFIGS = [dict(n_win=4, topk=3, grid=(8, 12)), dict(n_win=6, topk=2, grid=None)]


def check(config: dict, seed: int) -> None:
    assert_matches_reference("biformer", config, functools.partial(biformer_support, **config), seed, SHAPES)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_selection_is_the_papers(config, rng):
    check(config, rng.initial_seed())


def _least_similar(scores, count):
    return top_blocks(-scores, count)


def _row_strips(grid, n_win, device):
    """Regions as runs of the row-major order (1-D chunks) instead of 2-D windows."""
    return torch.arange(torch.Size(grid).numel(), device=device)


MUTANTS = [
    Mutant("biformer-least-similar-regions", biformer, "top_blocks", _least_similar),
    Mutant("biformer-row-strip-regions", biformer, "region_order", _row_strips),
]


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_is_caught(mutant, monkeypatch, rng):
    assert_caught(monkeypatch, mutant, lambda: check(CONFIGS[0], rng.initial_seed()))
