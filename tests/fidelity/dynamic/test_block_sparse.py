"""MInference block-sparse against its literal reference selection, and the wrong rules it must catch."""

from __future__ import annotations

import functools

import pytest
import torch
from fidelity.dynamic.checks import assert_matches_reference
from fidelity.dynamic.references import block_sparse_support
from fidelity.mutation import Mutant, assert_caught

from attnzoo.methods.dynamic import block_sparse
from attnzoo.methods.dynamic.scoring import pooled_scores, top_blocks

CONFIGS = [dict(top_k=3, block_size=16, local_blocks=1), dict(top_k=2, block_size=16, local_blocks=0)]


def check(config: dict, seed: int) -> None:
    support = functools.partial(block_sparse_support, **{k: config[k] for k in ("top_k", "block_size", "local_blocks")})
    assert_matches_reference("block_sparse", config, support, seed)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_selection_is_the_papers(config, rng):
    check(config, rng.initial_seed())


def _lowest_scored(scores, k):
    return top_blocks(torch.where(torch.isfinite(scores), -scores, scores), k)


def _scores_of_the_next_block(q, k, call, q_block, kv_block):
    return pooled_scores(q, k, call, q_block, kv_block).roll(1, -1)


MUTANTS = [
    Mutant("block_sparse-lowest-scored", block_sparse, "top_blocks", _lowest_scored),
    Mutant("block_sparse-scores-shifted-one-block", block_sparse, "pooled_scores", _scores_of_the_next_block),
]


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_is_caught(mutant, monkeypatch, rng):
    assert_caught(monkeypatch, mutant, lambda: check(CONFIGS[0], rng.initial_seed()))
