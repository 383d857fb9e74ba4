"""Sharding helpers of attnzoo.distributed (no processes needed)."""

from __future__ import annotations

import pytest
import torch

import attnzoo.distributed as azd
from attnzoo.errors import InvalidArgumentError


@pytest.mark.parametrize("layout, world, lengths", [("contiguous", 3, [4, 1, 7]), ("contiguous", 4, None), ("zigzag", 3, None)])
def test_shard_then_unshard_is_the_sequence(rng, layout, world, lengths):
    x = torch.randn(2, 3, 12, 5, generator=rng)
    shards = [azd.shard(x, r, world, layout=layout, lengths=lengths) for r in range(world)]
    assert torch.equal(azd.unshard(shards, layout=layout), x)
    assert sum(s.shape[2] for s in shards) == 12


def test_zigzag_pairs_early_and_late_chunks():
    """Rank r holds chunks r and 2W - 1 - r: written out for W = 2, 8 tokens."""
    assert azd.positions([4, 4], 0, "zigzag").tolist() == [0, 1, 6, 7]
    assert azd.positions([4, 4], 1, "zigzag").tolist() == [2, 3, 4, 5]


def test_bad_layouts_name_the_argument():
    x = torch.zeros(1, 1, 10, 2)
    with pytest.raises(InvalidArgumentError, match="^layout: .*divisible by 2 \\* world = 8"):
        azd.shard(x, 0, 4, layout="zigzag")
    with pytest.raises(InvalidArgumentError, match="^lengths: "):
        azd.shard(x, 0, 2, lengths=[3, 3])
    with pytest.raises(InvalidArgumentError, match="^layout: expected one of"):
        azd.positions([5, 5], 0, "striped")
