"""attnzoo.distributed over 2 and 4 gloo processes against the single-process call.

One spawn per world size runs every case (:mod:`dist_cases`); each test reads its case's worst
relative error over the ranks (max |distributed - single| / max |single|) for the output and the
gradients of q, k and v."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
import dist_cases

from attnzoo.distributed.comm import free_local_port

WORLDS = (2, 4)


def spawn(worker, world: int, tmp_path, *args):
    """Run ``worker(rank, world, port, out_path, *args)`` on ``world`` gloo processes; rank 0's JSON."""
    out_path = str(tmp_path / f"world{world}.json")
    mp.spawn(worker, args=(world, free_local_port(), out_path, *args), nprocs=world, join=True)
    with open(out_path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    return {world: spawn(dist_cases.worker, world, tmp) for world in WORLDS}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", [c.name for c in dist_cases.cases(2)])
def test_equals_single_process(results, world, name):
    got = results[world][name]
    where = f"{name} over {world} ranks, seed {got['seed']}: {got['case']}"
    assert got["forward"] <= 1e-5, f"forward error {got['forward']:.2e} in {where}"
    for grad in ("grad_q", "grad_k", "grad_v"):
        assert got[grad] <= 1e-4, f"{grad} error {got[grad]:.2e} in {where}"


@pytest.mark.parametrize("world", WORLDS)
def test_errors_name_the_argument(results, world):
    errors = results[world]["errors"]
    assert errors["layout"].startswith("InvalidArgumentError: layout:")
    assert "head" in errors["heads"] and "on every rank" in errors["heads"]
    assert errors["zigzag_uneven"].startswith("InvalidArgumentError: layout:")
    assert errors["no_form"].startswith("UnsupportedError") and "neighborhood" in errors["no_form"] and "dense" in errors["no_form"]
    assert errors["halo_zigzag"].startswith("InvalidArgumentError: layout:")
    assert errors["grid_rows"].startswith("InvalidArgumentError: shard lengths:")
    assert errors["estimator"].startswith("UnsupportedError") and "pooled_qk" in errors["estimator"]
    assert errors["blocks"].startswith("InvalidArgumentError: shard lengths:")
    assert errors["block_size"].startswith("InvalidArgumentError: block_size:")
    assert errors["single_group_equal"]


def test_traffic_is_counted_and_matches_the_volumes(results):
    """neighborhood 256 x 256, kernel 13, 4 ranks: each rank sends its halo, 6 rows of K and V per
    neighbour (within 10%); ring attention sends (W - 1) / W of K and V; a block selection moves
    only the blocks selected."""
    traffic = results[4]["traffic"]
    for rank, ratio in enumerate(traffic["halo_ratio"]):
        assert abs(ratio - 1) <= 0.1, f"rank {rank} sent {ratio:.3f} x its halo"
    for rank, ratio in enumerate(traffic["ring_ratio"]):
        assert abs(ratio - 1) <= 1e-9, f"rank {rank} sent {ratio:.3f} x (W - 1) / W of K and V"
    assert traffic["selection_excess"] == [0.0] * 4, "block_sparse moved blocks no query selected"
    assert max(traffic["selection_over_ring"]) < 0.2


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("layer", ["layer_dense", "layer_window"])
def test_attention_layer_trains_sequence_parallel(results, world, layer):
    """nn.Attention(process_group=...) on shards: the output and the summed parameter gradients equal
    the layer run on the whole sequence."""
    assert results[world][layer]["worst"] <= 1e-4
