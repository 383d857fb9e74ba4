"""S2-Attention's per-head shards against a literal reference of the pattern, and the wrong rules it must catch."""

from __future__ import annotations

import functools

import pytest
import torch
from fidelity.dynamic.checks import assert_matches_reference, mutant_test
from fidelity.dynamic.references import s2_support
from fidelity.mutation import Mutant

from attnzoo.methods.local import s2

CONFIGS = [dict(block_size=8, local_blocks=2, vert_stride=4), dict(block_size=16, local_blocks=1, vert_stride=3)]


def check(config: dict, seed: int) -> None:
    assert_matches_reference("s2", config, seed, support=functools.partial(s2_support, **config))


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_pattern_is_the_papers(config, rng):
    check(config, rng.initial_seed())


def test_the_heads_together_cover_every_block():
    """Every key block is in some head's shard: no context is lost by sharding."""
    q = torch.zeros(1, 4, 128, 8)
    support = s2_support(q, q, block_size=8, local_blocks=1, vert_stride=4, causal=False, scale=1.0)
    assert bool(support.any(1).all())


def _every_head_the_same_shard(self, call):
    return torch.zeros(call.heads_q, dtype=torch.long, device=call.device)




MUTANTS = [
    Mutant("s2-every-head-same-shard", s2.S2, "_offsets", _every_head_the_same_shard),
    Mutant("s2-stride-off-by-one", s2.S2, "_offsets", lambda self, call: torch.arange(call.heads_q, device=call.device) + 1),
]

test_mutant_is_caught = mutant_test(MUTANTS, lambda seed: check(CONFIGS[0], seed))
