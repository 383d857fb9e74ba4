"""S2-Attention's per-head shards against its ``.reference`` (``S2.reference_mask``: the pattern
written literally, loops over heads and key blocks), and the wrong rules it must catch."""

from __future__ import annotations

import pytest
import torch
from fidelity.dynamic.checks import assert_matches_reference, mutant_test
from fidelity.mutation import Mutant

import attnzoo
from attnzoo.method import check_qkv
from attnzoo.methods.local import s2

CONFIGS = [dict(block_size=8, local_blocks=2, vert_stride=4), dict(block_size=16, local_blocks=1, vert_stride=3)]


def check(config: dict, seed: int) -> None:
    assert_matches_reference("s2", config, seed)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_pattern_is_the_papers(config, rng):
    check(config, rng.initial_seed())


def test_the_heads_together_cover_every_block():
    """Every key block is in some head's shard: no context is lost by sharding."""
    q = torch.zeros(1, 4, 128, 8)
    m = attnzoo.get_method("s2", block_size=8, local_blocks=1, vert_stride=4)
    mask = m.reference_mask(check_qkv(q, q, q, causal=False, scale=None, check_finite=False))
    assert bool(mask.any(1).all())


def _every_head_the_same_shard(self, call):
    return torch.zeros(call.heads_q, dtype=torch.long, device=call.device)


MUTANTS = [
    Mutant("s2-every-head-same-shard", s2.S2, "_offsets", _every_head_the_same_shard),
    Mutant("s2-stride-off-by-one", s2.S2, "_offsets", lambda self, call: torch.arange(call.heads_q, device=call.device) + 1),
]

test_mutant_is_caught = mutant_test(MUTANTS, lambda seed: check(CONFIGS[0], seed))
