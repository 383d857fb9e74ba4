"""The shared block-sparse executor against its dense reference on random layouts."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import qkv, rel_err

from attnzoo.kernels.block_sparse import BlockLayout, block_sparse_attention
from attnzoo.kernels.block_sparse.builders import coarsen, compact


def random_layout(gen, Bl, Hl, num_q, num_kv, q_block, kv_block, causal, q_order=None):
    nqb, nkb = -(-num_q // q_block), -(-num_kv // kv_block)
    scores = torch.rand(Bl, Hl, nqb, nkb, generator=gen)
    keep = scores < 0.4
    keep[..., 0, :] = False  # the first query block visits nothing: its rows must come out zero
    keys = torch.where(keep, torch.arange(nkb).expand_as(keep), -1)
    mask_mod = None
    if causal:
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + (num_kv - num_q)
    return compact(keys, num_q, num_kv, q_block, kv_block=kv_block, mask_mod=mask_mod, q_order=q_order)


@pytest.mark.parametrize("Bl,Hl", [(1, 1), (2, 1), (1, 4), (2, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_gather_executor_equals_dense_reference(Bl, Hl, causal, rng):
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=100, Nk=130, Dv=8)
    layout = random_layout(rng, Bl, Hl, 100, 130, 16, 8, causal)
    ref, _ = block_sparse_attention(q, k, v, layout, scale=0.3, backend="naive")
    out, counts = block_sparse_attention(q, k, v, layout, scale=0.3, backend="gather", static=False)
    assert rel_err(out, ref) <= 1e-5
    assert torch.all(out[:, :, :16] == 0)  # rows with no key
    assert counts["allowed"] == int(layout.dense_mask(100, 130).expand(2, 4, -1, -1).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex, _ = block_sparse_attention(q, k, v, layout, scale=0.3, backend="flex")
    assert rel_err(flex, ref) <= 1e-5


def test_static_plans_are_cached_and_reused(rng):
    q, k, v = qkv(rng, Nq=64)
    layout = random_layout(rng, 1, 1, 64, 64, 16, 16, True)
    a, _ = block_sparse_attention(q, k, v, layout, scale=0.25, backend="gather", static=True)
    assert any(key[0] == "gather" for key in layout.cache)
    b, _ = block_sparse_attention(q, k, v, layout, scale=0.25, backend="gather", static=True)
    assert torch.equal(a, b)


def test_visiting_order_with_holes(rng):
    """A q_order that permutes queries and leaves holes (ragged tiles) still computes each row once."""
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=60)
    perm = torch.randperm(60, generator=rng)
    q_order = torch.cat([perm[:30], torch.full((2,), -1), perm[30:], torch.full((2,), -1)])
    layout = random_layout(rng, 1, 1, q_order.numel(), 60, 16, 4, False, q_order=q_order)
    ref, _ = block_sparse_attention(q, k, v, layout, scale=0.5, backend="naive")
    out, _ = block_sparse_attention(q, k, v, layout, scale=0.5, backend="gather")
    assert rel_err(out, ref) <= 1e-5


def test_coarsened_layout_covers_the_fine_one(rng):
    fine = random_layout(rng, 1, 2, 200, 200, 16, 1, True)
    coarse = coarsen(fine, 64)
    assert coarse.q_block == 64 and coarse.kv_block == 64
    f, c = fine.dense_mask(200, 200), coarse.dense_mask(200, 200)
    assert torch.all(c | ~f)  # every allowed fine entry is visited by the coarse layout


def test_layout_shape_errors():
    with pytest.raises(ValueError, match="kv_indices must be"):
        BlockLayout(10, 10, 4, 4, torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="query blocks listed, expected 3"):
        BlockLayout(10, 10, 4, 4, torch.zeros(1, 1, 2, 1, dtype=torch.long), torch.zeros(1, 1, 2, dtype=torch.long))


@pytest.mark.parametrize("name,cfg", [("streaming", dict(sinks=5, window=40)), ("moa", dict(spans=[20, 70, 33, 150], sinks=9))])
def test_sinks_run_as_a_prefix_merged_by_log_sum_exp(name, cfg, rng):
    """Without autograd, sinks + band layouts attend the sinks in one separate call and merge the two
    by log-sum-exp; with autograd they are gathered. Both equal the reference."""
    import attnzoo
    from attnzoo.method import check_qkv

    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=300, D=16)
    m = attnzoo.get_method(name, **cfg)
    ref = m.reference(q, k, v, causal=True)
    with torch.no_grad():
        out = m(q, k, v, causal=True)
    layout = m.layout(check_qkv(q, k, v, causal=True, scale=None), "torch")
    split = [p for row in layout.cache[("gather", torch.float32, True)] for p in row]
    assert all(p.prefix is not None and p.prefix.size == cfg["sinks"] for p in split)
    assert rel_err(out, ref) <= 1e-5
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    assert rel_err(m(qg, kg, vg, causal=True), ref) <= 1e-5


@pytest.mark.parametrize("name,cfg", [("sliding_window", dict(window=100)), ("streaming", dict(sinks=3, window=90)),
                                      ("moa", dict(spans=[70, 130, 100, 250], sinks=5))])
@pytest.mark.parametrize("grad", [False, True])
def test_long_bands_run_as_strided_windows(name, cfg, grad, rng):
    """Long bands: runs of query blocks share one SDPA call over overlapping key windows (no copy);
    GQA folds query heads into rows. Equal to the reference with and without autograd."""
    import attnzoo

    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=1000, D=16)
    m = attnzoo.get_method(name, **cfg)
    ref = m.reference(q, k, v, causal=True)
    if grad:
        q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    with torch.set_grad_enabled(grad):
        out = m(q, k, v, causal=True)
    assert rel_err(out, ref) <= 1e-5
    if grad:
        w = torch.randn(out.shape, generator=rng)
        fast = torch.autograd.grad((out * w).sum(), (q, k, v))
        slow = torch.autograd.grad((m.reference(q, k, v, causal=True) * w).sum(), (q, k, v))
        for a, b in zip(fast, slow):
            assert rel_err(a, b) <= 1e-4
