"""HiP's tree search against its literal reference, per branch score, and the wrong rules it must catch."""

from __future__ import annotations

import functools

import pytest
from fidelity.dynamic.checks import assert_matches_reference, mutant_test
from fidelity.dynamic.references import hip_support
from fidelity.mutation import Mutant

from attnzoo.methods.dynamic import hip

CONFIGS = [
    dict(top_k=3, block_size=16, branch_score="paper"),
    dict(top_k=2, block_size=16, branch_score="paper", key_block_size=8, local_blocks=0),
    dict(top_k=3, block_size=16, branch_score="pooled"),
    dict(top_k=3, block_size=16, branch_score="bound"),
    dict(top_k=3, block_size=16, query_samples=3),
    dict(top_k=3, block_size=16, branch_score="bound", query_samples=2),
]
CONFIGS = [dict(c, candidates=1) for c in CONFIGS]  # the search alone (the default re-ranks a shortlist of 8 top_k)


def check(config: dict, seed: int) -> None:
    default_score = "paper" if config.get("query_samples") else "bound"  # the documented default
    options = dict(local_blocks=1, key_block_size=None, branch_score=default_score) | {k: config[k] for k in config if k not in ("top_k", "candidates")}
    support = functools.partial(hip_support, top_k=config["top_k"], **options)
    assert_matches_reference("hip", config, support, seed)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_selection_is_the_papers(config, rng):
    check(config, rng.initial_seed())


def test_the_default_without_query_samples_is_the_bound_and_with_them_the_paper():
    assert hip.HiP().config.branch_score == "bound"
    assert hip.HiP(query_samples=4).config.branch_score == "paper"


def _no_tree_search(qp, reach, score, bounds, top_k):
    """The first block of each initial range, no descent."""
    return bounds[:, :-1].expand(*qp.shape[:2], -1, -1)


MUTANTS = [
    Mutant("hip-no-tree-search", hip, "_search", _no_tree_search),
    Mutant("hip-first-block-represents", hip, "representative_block", lambda starts, ends: starts),
]

test_mutant_is_caught = mutant_test(MUTANTS, lambda seed: [check(config, seed) for config in CONFIGS[:2]])
