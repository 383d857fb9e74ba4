"""Known answers: inputs with planted structure (fidelity.dynamic.planted), each content-selected
method at its default budget, and the recall of the exact attention mass on the rows that have a
planted target. A planted pair has logit 12, so a found target keeps recall near 1 and a missed
one leaves only the few percent on the always-visited blocks. The thresholds follow each design:

- block_sparse scores every key block by pooled q . k: a strong block is found wherever it is (0.97).
- hip searches a tree that scores a range by one representative block (attention locality): a
  target with strong neighbours (4 blocks, fading) is followed down the tree (0.97); a lone
  block is found only when it falls on a representative, so it is held to 0.75.
- vertical_slash keeps the heaviest key columns and diagonals of the last queries' attention:
  vertical lines and a slash at a fixed offset are exactly its pattern (0.95; the slash's block
  diagonals also hold a block's worth of other keys); a key only the prompt's last queries read
  is kept by its late columns (0.75, see the test).
- routing clusters queries and keys with k-means: with 4 planted clusters of equal size, its
  balanced windows of N / 4 tokens are the clusters themselves (0.97).
- hyper sorts by a 7-bit angular hash: 32 clusters of one block each land in 128 buckets, and a
  cluster that shares its bucket with another (probability about 0.22) keeps about half, so
  about 0.89 is expected and 0.7 is required.
- biformer routes every region to its top-4 regions by region q . k: the partner region of a
  2-D match has by far the highest affinity (0.97).
SEA (its training-free part) has no test here: its Performer estimate of planted logits this large
has a standard deviation several times its mean, which its learned decoder is there to fix.
"""

from __future__ import annotations

import pytest
import torch
from fidelity.dynamic import planted

import attnzoo

N, D, BLOCK = 2048, 64, 64  # the default block size of hip, block_sparse and vertical_slash


def recall(name: str, q, k, rows, causal: bool, **config) -> float:
    support = attnzoo.get_method(name, **config).support(q, k, k, causal=causal)
    return planted.recall_on(q, k, support, rows, causal=causal)


FAR = [("block_sparse", {}, 1, 0.97), ("hip", {}, 4, 0.97), ("hip", dict(branch_score="paper"), 4, 0.97), ("hip", {}, 1, 0.75)]


@pytest.mark.parametrize("name,config,width,threshold", FAR, ids=[f"{f[0]}-{f[1]}-width{f[2]}" for f in FAR])
def test_a_far_block_per_query_block_is_found(name, config, width, threshold, rng):
    q, k, rows = planted.far_blocks(rng, N, D, BLOCK, width=width)
    got = recall(name, q, k, rows, True, **config)
    assert got >= threshold, f"{name} {config} width={width}: recall {got:.3f} < {threshold} (seed {rng.initial_seed()})"


def test_vertical_lines_are_found(rng):
    q, k, rows = planted.vertical_columns(rng, N, D, [300, 900, 1500])
    got = recall("vertical_slash", q, k, rows, True)
    assert got >= 0.95, f"recall {got:.3f} (seed {rng.initial_seed()})"


def test_a_key_only_the_question_reads_is_found(rng):
    """The prompt's last 4 queries read one far key; 300 shared columns that every query reads outvote
    it in the spread estimate (which alone keeps about 0.2 to 0.45 here), so only the late columns,
    read from the last queries, find it. Found, the key holds 0.37 to 0.7 of those rows' mass and the
    shared columns kept add the rest: 0.75."""
    q, k, rows = planted.question(rng, N, D, key=300, asking=4, common=300)
    got = recall("vertical_slash", q, k, rows, True)
    assert got >= 0.75, f"recall {got:.3f} (seed {rng.initial_seed()})"


def test_a_slash_at_an_offset_is_found(rng):
    q, k, rows = planted.slash(rng, N, D, offset=300)
    got = recall("vertical_slash", q, k, rows, True)
    assert got >= 0.95, f"recall {got:.3f} (seed {rng.initial_seed()})"


@pytest.mark.parametrize("causal", [False, True])
def test_token_clusters_are_routed_together(causal, rng):
    q, k, rows = planted.clusters(rng, N, D, 4)
    got = recall("routing", q, k, rows, causal)
    assert got >= 0.97, f"recall {got:.3f} (seed {rng.initial_seed()})"


def test_hyper_pairs_the_blocks_of_a_cluster(rng):
    q, k, rows = planted.clusters(rng, N, D, N // BLOCK, level=0.0)
    got = recall("hyper", q, k, rows, False)
    assert got >= 0.7, f"recall {got:.3f} (seed {rng.initial_seed()})"


def test_matching_2d_regions_are_routed(rng):
    q, k, rows = planted.matching_regions(rng, 28, D, 7)
    got = recall("biformer", q, k, rows, False, grid=(28, 28))
    assert got >= 0.97, f"recall {got:.3f} (seed {rng.initial_seed()})"


def test_missing_the_target_leaves_little_recall(rng):
    """The planted targets hold the mass: a selection that skips them (the diagonal and local
    blocks only) keeps little, so the thresholds above measure finding them."""
    q, k, rows = planted.far_blocks(rng, N, D, BLOCK)
    local = torch.ones(N, N, dtype=torch.bool).tril().triu(-2 * BLOCK)
    assert planted.recall_on(q, k, local, rows, causal=True) < 0.1
