"""oracle_recall: the bound on attention mass a support of given density can keep."""

from __future__ import annotations

import pytest
import torch
from helpers import qkv

import attnzoo
from attnzoo import InvalidArgumentError
from attnzoo.eval import attention_recall, oracle_recall
from attnzoo.kernels.dense import attention_scores, causal_mask


@pytest.mark.parametrize("block_size", [None, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_full_density_keeps_everything(rng, block_size, causal):
    q, k, _ = qkv(rng, B=1, Hq=4, Hkv=2, Nq=50, D=16)
    kept = oracle_recall(q, k, causal=causal, scale=0.25, density=1.0, block_size=block_size)
    torch.testing.assert_close(kept, torch.ones(4, dtype=torch.float64), msg=f"seed {rng.initial_seed()}")


def test_one_tile_of_four_is_the_heaviest_tile(rng):
    q, k, _ = qkv(rng, B=1, Hq=1, Hkv=1, Nq=4, D=8)
    probs = torch.softmax(attention_scores(q.double(), k.double(), scale=1.0), -1)[0, 0]
    tiles = probs.view(2, 2, 2, 2).sum((1, 3))  # (query block, key block)
    best = float(tiles.max()) / 4
    kept = oracle_recall(q, k, causal=False, scale=1.0, density=0.25, block_size=2)
    assert float(kept) == pytest.approx(best), f"seed {rng.initial_seed()}"


def test_bounds_the_methods_and_coarser_supports(rng):
    """The token-level bound is exact (each head's top entries), so no support of the same density,
    block-made or a method's, keeps more."""
    q, k, v = qkv(rng, B=1, Hq=4, Hkv=2, Nq=256, D=16)
    method = attnzoo.get_method("block_sparse", top_k=3, block_size=16, estimator="sampled_q")
    support = method.support(q, k, v, causal=True, scale=0.25)
    density = float((support & causal_mask(256, 256)).sum()) / (4 * 256 * 257 / 2)
    achieved = attention_recall(q, k, support, causal=True, scale=0.25)
    tokens = oracle_recall(q, k, causal=True, scale=0.25, density=density)
    blocks = oracle_recall(q, k, causal=True, scale=0.25, density=density, block_size=16)
    context = f"seed {rng.initial_seed()}, density {density:.3f}"
    assert bool((tokens >= achieved - 1e-9).all()), context
    assert bool((tokens >= blocks - 1e-9).all()), context


def test_density_is_checked(rng):
    q, k, _ = qkv(rng, B=1, Hq=1, Hkv=1, Nq=8, D=4)
    with pytest.raises(InvalidArgumentError, match="density"):
        oracle_recall(q, k, causal=False, scale=1.0, density=0.0)
