"""The block-granular CPU executor (kernels/block_sparse/blocks.py) against the naive dense reference
on random per-batch/per-head selection layouts."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import qkv, rel_err

from attnzoo.kernels.block_sparse import CausalMask, block_sparse_attention
from attnzoo.kernels.block_sparse.blocks import block_attention, can_run
from attnzoo.kernels.block_sparse.builders import compact


def random_blocks(gen, Bl, Hl, num_q, num_kv, q_block, kv_block, mask_mod, density=0.4):
    nqb, nkb = -(-num_q // q_block), -(-num_kv // kv_block)
    keep = torch.rand(Bl, Hl, nqb, nkb, generator=gen) < density
    keep[..., 0, :] = False  # the first query block visits nothing: its rows must come out zero
    keys = torch.where(keep, torch.arange(nkb).expand_as(keep), -1)
    return compact(keys, num_q, num_kv, q_block, kv_block=kv_block, mask_mod=mask_mod)


def with_columns(gen, layout, count, num_kv):
    """The layout plus ``count`` random single key columns per entry, with repeats and -1 holes."""
    Bl, Hl = layout.kv_indices.shape[:2]
    columns = torch.randint(-1, num_kv, (Bl, Hl, count), generator=gen)
    columns[..., 1] = columns[..., 0]  # a repeat counts once
    return compact(layout.kv_indices.masked_fill(~layout.slot_valid(), -1), layout.num_q, num_kv, layout.q_block,
                   kv_block=layout.kv_block, mask_mod=layout.mask_mod, columns=columns)


def generic_causal(num_q, num_kv):
    return lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + (num_kv - num_q)


MASKS = {
    "none": lambda nq, nk: None,
    "causal": lambda nq, nk: CausalMask(nk - nq),
    "generic-causal": generic_causal,
    "per-head-stripes": lambda nq, nk: (lambda b, h, q_idx, kv_idx: (kv_idx + h) % 3 != 0),
}
SHAPES = [(16, 16, 96, 96), (16, 8, 100, 130), (32, 16, 70, 70), (8, 16, 40, 200)]


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("q_block,kv_block,nq,nk", SHAPES)
def test_blocks_executor_equals_naive(mask, q_block, kv_block, nq, nk, rng):
    sharing = (list(MASKS).index(mask) + [s[2] for s in SHAPES].index(nq)) % 4  # each appears 4 times
    Bl, Hl = [(1, 1), (2, 4), (1, 4), (2, 1)][sharing]
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=nq, Nk=nk, Dv=8)
    layout = random_blocks(rng, Bl, Hl, nq, nk, q_block, kv_block, MASKS[mask](nq, nk))
    assert can_run(q, k, v, layout) is None
    ref, _ = block_sparse_attention(q, k, v, layout, scale=0.3, backend="naive")
    out, counts = block_sparse_attention(q, k, v, layout, scale=0.3, backend="gather", static=False)
    assert rel_err(out, ref) <= 1e-5, rng.initial_seed()
    assert torch.all(out[:, :, :q_block] == 0)
    dense = layout.dense_mask(nq, nk).expand(2, 4, -1, -1)
    assert counts["allowed"] == int(dense.sum())
    assert counts["computed"] >= counts["allowed"]


@pytest.mark.parametrize("mask,columns", [("causal", 0), ("generic-causal", 0), ("causal", 12)])
def test_blocks_executor_gradients(mask, columns, rng):
    """Gradients equal the reference's, single columns included (their merge differentiates the
    log-sum-exp, which the CPU flash kernel's backward would ignore)."""
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=90, Nk=90, Dv=8, dtype=torch.float64, requires_grad=True)
    layout = random_blocks(rng, 2, 4, 90, 90, 16, 16, MASKS[mask](90, 90), density=0.3 if columns else 0.6)
    if columns:
        layout = with_columns(rng, layout, columns, 90)
    grad_out = torch.randn(2, 4, 90, 8, generator=rng, dtype=torch.float64)
    ref, _ = block_sparse_attention(q, k, v, layout, scale=0.3, backend="naive")
    want = torch.autograd.grad((ref * grad_out).sum(), (q, k, v))
    out, _, _ = block_attention(q, k, v, layout, scale=0.3, static=False)
    got = torch.autograd.grad((out * grad_out).sum(), (q, k, v))
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blocks_executor_low_precision(dtype, rng):
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, Nq=128, Dv=16)
    layout = random_blocks(rng, 1, 2, 128, 128, 32, 32, CausalMask(0), density=0.7)
    ref, _ = block_sparse_attention(q, k, v, layout, scale=0.25, backend="naive")
    out, _, _ = block_attention(q.to(dtype), k.to(dtype), v.to(dtype), layout, scale=0.25, static=False)
    assert out.dtype == dtype
    assert rel_err(out, ref) <= 2e-2


def test_static_plan_is_cached_and_reused(rng):
    q, k, v = qkv(rng, Nq=64)
    layout = random_blocks(rng, 1, 1, 64, 64, 16, 16, CausalMask(0))
    a, _, _ = block_attention(q, k, v, layout, scale=0.25, static=True)
    assert ("gather", "blocks", torch.float32) in layout.cache
    b, _, _ = block_attention(q, k, v, layout, scale=0.25, static=True)
    assert torch.equal(a, b)


def test_token_layouts_and_orders_are_not_handled(rng):
    q, k, v = qkv(rng, Nq=64)
    keys = torch.arange(8).expand(4, -1)
    assert can_run(q, k, v, compact(keys, 64, 64, 16)) == "key blocks of one token"  # the gather executor's
    assert "visiting order" in can_run(q, k, v, compact(keys, 64, 64, 16, kv_block=8, q_order=torch.arange(64)))


@pytest.mark.parametrize("mask", ["causal", "per-head-stripes"])
def test_entries_that_list_no_tile(mask, rng):
    """Heads whose query blocks list nothing return zeros; the others still run."""
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=70, Dv=8)
    keys = torch.full((2, 4, 5, 3), -1)
    keys[0, 0, 1, 0] = 1
    layout = compact(keys, 70, 70, 16, kv_block=16, mask_mod=MASKS[mask](70, 70))
    ref, _ = block_sparse_attention(q, k, v, layout, scale=0.3, backend="naive")
    out, _ = block_sparse_attention(q, k, v, layout, scale=0.3, backend="gather", static=False)
    assert rel_err(out, ref) <= 1e-5
    assert torch.all(out[1] == 0) and torch.any(out[0, 0] != 0)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("q_block,kv_block,nq,nk", SHAPES[:3])
def test_single_columns_on_top_of_blocks(mask, q_block, kv_block, nq, nk, rng):
    """Columns are attended where their block is not listed and merged by log-sum-exp: the CPU
    executor and FlexAttention (eager) equal the dense reference, and each entry counts once."""
    sharing = (list(MASKS).index(mask) + [s[2] for s in SHAPES].index(nq)) % 4
    Bl, Hl = [(1, 1), (2, 4), (1, 4), (2, 1)][sharing]
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=nq, Nk=nk, Dv=8)
    layout = with_columns(rng, random_blocks(rng, Bl, Hl, nq, nk, q_block, kv_block, MASKS[mask](nq, nk), density=0.2), 9, nk)
    dense = layout.dense_mask(nq, nk)
    assert bool((dense & ~compact(layout.kv_indices.masked_fill(~layout.slot_valid(), -1), nq, nk, q_block, kv_block=kv_block,
                                  mask_mod=layout.mask_mod).dense_mask(nq, nk)).any())  # the columns add entries
    ref, _ = block_sparse_attention(q, k, v, layout, scale=0.3, backend="naive")
    out, counts = block_sparse_attention(q, k, v, layout, scale=0.3, backend="gather", static=False)
    assert rel_err(out, ref) <= 1e-5, rng.initial_seed()
    assert counts["allowed"] == int(dense.expand(2, 4, -1, -1).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is not compiled
        flex, _ = block_sparse_attention(q, k, v, layout, scale=0.3, backend="flex")
    assert rel_err(flex, ref) <= 1e-5, rng.initial_seed()


def test_columns_need_a_selection_layout_in_natural_order():
    keys = torch.zeros(1, 1, 4, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="columns must be"):
        compact(keys, 64, 64, 16, kv_block=16, columns=torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="natural token order"):
        compact(keys, 64, 64, 16, kv_block=16, columns=torch.zeros(1, 1, 3, dtype=torch.long), q_order=torch.arange(64))
