"""seer: the AttnGate's training target against a literal block-max, its selection, its gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import qkv

import attnzoo
from attnzoo.errors import InvalidArgumentError
from attnzoo.kernels.dense import causal_mask
from attnzoo.methods.learned.seer import block_extremes, block_max_target


def literal_block_max(q, k, *, causal, scale, block, pool="max"):
    """Dense softmax, then a Python loop taking the max (or the sum) of every block x block tile, rows normalised."""
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).double()
    logits = q.double() @ kk.transpose(-1, -2) * scale
    if causal:
        logits = logits.masked_fill(~causal_mask(q.shape[2], k.shape[2]), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    nqb, nkb = -(-q.shape[2] // block), -(-k.shape[2] // block)
    out = torch.zeros(*q.shape[:2], nqb, nkb, dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(nqb):
                for j in range(nkb):
                    tile = probs[b, h, i * block:(i + 1) * block, j * block:(j + 1) * block]
                    out[b, h, i, j] = tile.max() if pool == "max" else tile.sum()
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("pool", ["max", "sum"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq, nk", [(64, 64), (45, 45), (21, 53)])
def test_pooled_target_is_a_literal_block_max(rng, causal, nq, nk, pool):
    q, k, _ = qkv(rng, B=2, Hq=4, Hkv=2, Nq=nq, Nk=nk, D=8)
    q = q * 2.0  # peaked rows, so the max of a tile differs from its mean
    got = block_max_target(q, k, causal=causal, scale=8 ** -0.5, block=16, pool=pool)
    want = literal_block_max(q, k, causal=causal, scale=8 ** -0.5, block=16, pool=pool)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_target_pool_is_checked():
    with pytest.raises(InvalidArgumentError, match="target"):
        attnzoo.get_method("seer", target="mean")
    with pytest.raises(InvalidArgumentError, match="pool"):
        block_max_target(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), causal=True, scale=0.5, block=4, pool="mean")


def test_block_extremes_cover_a_ragged_last_block(rng):
    x = torch.randn(1, 2, 10, 3, generator=rng)
    high, low = block_extremes(x, 4)
    assert high.shape == (1, 2, 3, 3)
    assert torch.equal(high[:, :, 2], x[:, :, 8:].amax(2)) and torch.equal(low[:, :, 0], x[:, :, :4].amin(2))


def test_selection_keeps_forced_blocks_and_follows_the_gate(rng):
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, Nq=128, Nk=128, D=16)
    seer = attnzoo.get_method("seer", block_size=16, top_k=3, local_blocks=0)
    seer.materialize(2, 1, 16, 16)
    layout = seer.selection(q, k, v, causal=True)
    blocks = layout.dense_mask(128, 128)[0, 0, ::16, ::16]  # one entry per (query block, key block)
    assert blocks.diagonal().all() and blocks[:, 0].all()  # the diagonal and the first block are always kept
    assert int(blocks[7].sum()) == 3
    logits = seer.gate_logits(q, k, causal=True)
    chosen = [j for j in range(8) if blocks[7, j] and j not in (0, 7)]
    assert chosen == [int(logits[0, 0, 7, 1:7].argmax()) + 1]  # the third block is the gate's best other block


def test_threshold_keeps_blocks_above_it(rng):
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=96, Nk=96, D=16)
    seer = attnzoo.get_method("seer", block_size=16, threshold=0.3, local_blocks=0)
    seer.materialize(2, 2, 16, 16)
    probs = torch.softmax(seer.gate_logits(q, k, causal=False), dim=-1)
    blocks = seer.selection(q, k, v, causal=False).dense_mask(96, 96)[0, :, ::16, ::16]
    expected = probs[0] >= 0.3
    expected[..., 0] = True  # the first block (attention sinks) is always kept
    assert torch.equal(blocks, expected)


def test_gate_gradients_reach_only_the_gate(rng):
    q, k, _ = qkv(rng, B=1, Hq=2, Hkv=2, Nq=64, Nk=64, D=16)
    seer = attnzoo.get_method("seer", block_size=16)
    seer.materialize(2, 2, 16, 16)
    seer.gate_logits(q, k, causal=True).masked_fill(torch.isinf(seer.gate_logits(q, k, causal=True)), 0).sum().backward()
    assert seer.gate.query.grad.abs().sum() > 0 and seer.gate.key.grad.abs().sum() > 0
    with pytest.raises(InvalidArgumentError, match="query heads"):
        seer.gate_logits(torch.randn(1, 3, 64, 16), torch.randn(1, 3, 64, 16))


def test_the_benchmark_oracle_keeps_the_blocks_of_most_exact_mass(rng):
    """benchmarks/distill_seer_bound.py's oracle (block_sparse sampled_q with every query of a block sampled)
    keeps, besides the diagonal, first and local blocks, each query block's key blocks of most exact mass."""
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, Nq=96, Nk=96, D=16)
    q = q * 2.0
    oracle = attnzoo.get_method("block_sparse", estimator="sampled_q", samples=16, top_k=4, block_size=16, local_blocks=1)
    kept = oracle.selection(q, k, v, causal=True).dense_mask(96, 96)[0, :, ::16, ::16]
    mass = literal_block_max(q, k, causal=True, scale=16 ** -0.5, block=16, pool="sum")[0]
    for h in range(2):
        for i in range(6):
            forced = {i, 0, max(i - 1, 0)}
            rest = [j for j in mass[h, i, : i + 1].argsort(descending=True).tolist() if j not in forced][: max(0, 4 - len(forced))]
            assert {j for j in range(6) if kept[h, i, j]} == forced | set(rest), (h, i)
