"""Executor dispatch (kernels/backends.py) for the block-sparse and linear families: the executor a
counts dict or ``linear_executor`` names is the one that ran, ``can_run`` reasons, forced backends
that cannot run, aliases; and every block-sparse executor's log-sum-exp against the plain softmax."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import qkv, rel_err

import attnzoo
from attnzoo.errors import InvalidArgumentError, UnsupportedError
from attnzoo.kernels import block_sparse, linear
from attnzoo.kernels.block_sparse import CausalMask, block_sparse_attention, block_sparse_executor, blocks, flex, gather, strip
from attnzoo.kernels.linear import linear_executor
from attnzoo.method import check_qkv
from attnzoo.kernels.block_sparse.builders import compact


def box_layout(q, k):
    """A 2-D neighborhood on a 16 x 16 grid: tiles against boxes of keys (the strip executor's)."""
    m = attnzoo.get_method("neighborhood", kernel_size=5, grid=(16, 16))
    return m.layout(check_qkv(q, k, k, causal=False, scale=None), "torch")


def block_layout(gen, n, causal=True, columns=0):
    """Random key blocks of 16 per query block of 16, per batch row and head; optional single columns."""
    nb = -(-n // 16)
    keep = torch.rand(2, 4, nb, nb, generator=gen) < 0.4
    keep[..., 0, :] = False  # the first query block visits nothing
    keys = torch.where(keep, torch.arange(nb), -1)
    cols = torch.randint(-1, n, (2, 4, columns), generator=gen) if columns else None
    return compact(keys, n, n, 16, kv_block=16, mask_mod=CausalMask(0) if causal else None, columns=cols)


def token_layout(gen, n, q_order=None):
    """Random key tokens per query block of 8 (kv_block 1): gathered."""
    nqb = -(-(n if q_order is None else q_order.numel()) // 8)
    keep = torch.rand(nqb, n, generator=gen) < 0.3
    keep[0] = False
    keys = torch.where(keep, torch.arange(n), -1)
    num_q = n if q_order is None else q_order.numel()
    return compact(keys, num_q, n, 8, q_order=q_order)


def band_layout(n, window, sinks=0):
    """Causal window (keys i - window < j <= i) plus ``sinks`` leading keys, listed as token ranges
    per query block of 16 and covering the mask: the gather executor's strided bands."""
    lists = []
    for first in range(0, n, 16):
        last = min(n, first + 16) - 1
        lists.append(sorted(set(range(min(sinks, n))) | set(range(max(0, first - window + 1), last + 1))))
    keys = torch.full((len(lists), max(map(len, lists))), -1)
    for i, row in enumerate(lists):
        keys[i, : len(row)] = torch.tensor(row)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx > q_idx - window) | (kv_idx < sinks))

    return compact(keys, n, n, 16, mask_mod=mask_mod, covers_mask=True)


def holes_order(gen, n):
    perm = torch.randperm(n, generator=gen)
    return torch.cat([perm[: n // 2], torch.full((3,), -1), perm[n // 2 :], torch.full((1,), -1)])


# each kind of layout, the executor auto must pick on CPU, and the plan-cache key that running it leaves
CASES = {
    "boxes": (lambda gen, q, k: box_layout(q, k), "strip", lambda key: key[0] == "strip"),
    "blocks": (lambda gen, q, k: block_layout(gen, 256), "blocks", lambda key: key[:2] == ("gather", "blocks")),
    "blocks+columns": (lambda gen, q, k: block_layout(gen, 256, columns=7), "blocks", lambda key: key[:2] == ("gather", "blocks")),
    "tokens": (lambda gen, q, k: token_layout(gen, 256), "gather", lambda key: key[0] == "gather" and key[1] != "blocks"),
    "tokens+q_order": (lambda gen, q, k: token_layout(gen, 256, holes_order(gen, 256)), "gather",
                       lambda key: key[0] == "gather" and key[1] != "blocks"),
    "band": (lambda gen, q, k: band_layout(256, 40), "gather", lambda key: key[0] == "gather" and key[1] != "blocks"),
    "band+sinks": (lambda gen, q, k: band_layout(256, 40, sinks=5), "gather", lambda key: key[0] == "gather" and key[1] != "blocks"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_counts_name_the_executor_that_ran(case, rng):
    build, expected, ran = CASES[case]
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=256, D=16)
    layout = build(rng, q, k)
    assert block_sparse_executor(q, k, v, layout).name == expected
    for backend in ("auto", "torch", "gather"):  # gather: the old name of torch
        layout.cache.clear()
        out, counts = block_sparse_attention(q, k, v, layout, scale=0.25, backend=backend)
        assert (counts["executor"], counts["backend"]) == (expected, "torch")
        assert layout.cache and all(ran(key) for key in layout.cache), list(layout.cache)
    ref, counts = block_sparse_attention(q, k, v, layout, scale=0.25, backend="naive")
    assert (counts["executor"], counts["backend"]) == ("naive", "naive")
    assert rel_err(out, ref) <= 1e-5, rng.initial_seed()


def test_flex_backend_runs_flex(rng):
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=128, D=16)
    layout = block_layout(rng, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is not compiled
        _, counts = block_sparse_attention(q, k, v, layout, scale=0.25, backend="flex")
    assert (counts["executor"], counts["backend"]) == ("flex", "flex")
    assert list(layout.cache) == ["flex_block_mask"]


def test_can_run_reasons(rng):
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=256, D=16)
    boxes, tokens, cols = box_layout(q, k), token_layout(rng, 256), block_layout(rng, 256, columns=3)
    assert strip.can_run(q, k, v, boxes) is None
    assert strip.can_run(q, k, v, tokens) == "the layout has no 2-D boxes"
    assert "grid" in strip.can_run(q[:, :, :100], k, v, boxes)
    assert blocks.can_run(q, k, v, tokens) == "key blocks of one token"
    assert blocks.can_run(q, k, v, cols) is None
    ordered = compact(torch.arange(8).expand(16, -1), 256, 256, 16, kv_block=8, q_order=torch.arange(256))
    assert blocks.can_run(q, k, v, ordered) == "a visiting order (q_order / kv_order)"
    assert "single key columns" in gather.can_run(q, k, v, cols)
    assert gather.can_run(q, k, v, boxes) is None and flex.can_run(q, k, v, cols) is None


def test_a_forced_backend_that_cannot_run_names_every_reason(rng, monkeypatch):
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=64, D=16)
    keys = torch.arange(8).expand(8, -1)
    cols = compact(keys, 64, 64, 8, columns=torch.tensor([[[3, 40]]]))  # columns on one-token key blocks
    for backend in ("torch", "auto"):
        with pytest.raises(UnsupportedError) as err:
            block_sparse_attention(q, k, v, cols, scale=0.25, backend=backend)
        message = str(err.value)
        assert message.startswith(f"backend: {backend!r}")
        for reason in ("strip (torch): the layout has no 2-D boxes", "blocks (torch): key blocks of one token",
                       "gather (torch): single key columns", "flex (flex): can run", "naive (naive): can run"):
            assert reason in message, message
    monkeypatch.setattr(flex, "available", lambda: False)
    with pytest.raises(UnsupportedError, match="flex_attention is not available"):
        block_sparse_attention(q, k, v, block_layout(rng, 64), scale=0.25, backend="flex")
    with pytest.raises(InvalidArgumentError, match=r"backend: expected one of \('auto', 'torch', 'flex', 'naive', 'gather'\)"):
        block_sparse_attention(q, k, v, cols, scale=0.25, backend="triton")


def test_dispatch_reads_no_tensor_data():
    """The checks are O(1) on shapes and layout attributes: they run on meta tensors (no data)."""
    meta = dict(device="meta")
    q, k = torch.empty(2, 4, 64, 16, **meta), torch.empty(2, 2, 64, 16, **meta)
    ids, counts = torch.empty(2, 4, 4, 3, dtype=torch.long, **meta), torch.empty(2, 4, 4, dtype=torch.long, **meta)
    layout = block_sparse.BlockLayout(64, 64, 16, 16, ids, counts)
    assert block_sparse_executor(q, k, k, layout).name == "blocks"
    assert block_sparse_executor(q, k, k, layout, "naive").name == "naive"
    assert linear_executor(q, k, k, causal=True).name == "chunked"


def test_backend_names_and_aliases():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert block_sparse.BACKENDS == ("auto", "torch", "flex", "naive", "gather")
    assert linear.BACKENDS == ("auto", "torch", "triton")
    assert [block_sparse.choose_backend(b, cpu) for b in ("auto", "torch", "gather", "flex", "naive")] == [
        "torch", "torch", "torch", "flex", "naive"]
    assert block_sparse.choose_backend("auto", cuda) == ("flex" if flex.available() else "torch")
    assert [linear.choose_backend(b, cpu) for b in ("auto", "torch", "triton")] == ["torch", "torch", "triton"]
    assert linear.choose_backend("auto", cuda) == ("triton" if linear.chunked.triton_available() else "torch")
    with pytest.raises(InvalidArgumentError, match="backend"):
        linear.choose_backend("gather", cpu)


def test_linear_executors_and_reasons(rng, monkeypatch):
    q, k, v = torch.rand(1, 4, 20, 8, generator=rng), torch.rand(1, 2, 20, 8, generator=rng), torch.randn(1, 2, 20, 3, generator=rng)
    assert linear_executor(q, k, v, causal=False).name == "one_pass"
    assert linear_executor(q, k, v, causal=True).name == "chunked"
    assert linear_executor(q, k, v, causal=True, backend="torch").backend == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UnsupportedError) as err:
        linear.linear_attention(q, k, v, causal=True, backend="triton")
    message = str(err.value)
    assert "one_pass (torch): causal attention" in message and "chunked (torch): can run" in message
    assert "triton (triton): " in message and ("needs CUDA" in message or "not installed" in message)
    with pytest.raises(UnsupportedError, match="triton \\(triton\\): non-causal"):
        linear.state_product(q, k, v, causal=False, backend="triton")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("grad", [False, True])
def test_torch_executors_return_the_log_sum_exp(case, grad, rng, softmax):
    """return_lse: the same output, and each row's log-sum-exp over its allowed keys (-inf where
    none); with autograd, gradients through both equal the plain softmax's."""
    build, expected, _ = CASES[case]
    dtype = torch.float64 if grad else torch.float32
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=256, D=8, dtype=dtype, requires_grad=grad)
    layout = build(rng, q, k)
    allowed = layout.dense_mask(256, 256)
    want_out, want_lse = softmax.reference(q, k, v, allowed, 0.3)
    with torch.set_grad_enabled(grad):
        out, lse, counts = block_sparse_attention(q, k, v, layout, scale=0.3, return_lse=True)
    assert counts["executor"] == expected
    if case == "band+sinks" and not grad:  # the sinks ran as a separate call merged by log-sum-exp
        assert all(p.prefix is not None for row in layout.cache[("gather", dtype, True)] for p in row)
    assert lse.dtype == dtype
    assert rel_err(out, want_out) <= (1e-10 if grad else 1e-5), rng.initial_seed()
    softmax.assert_same_lse(lse, want_lse, 1e-10 if grad else 1e-5)
    if grad:
        w, w_lse = torch.randn(out.shape, generator=rng, dtype=dtype), torch.randn(lse.shape, generator=rng, dtype=dtype)
        got = torch.autograd.grad((out * w).sum() + (softmax.finite(lse) * w_lse).sum(), (q, k, v))
        want = torch.autograd.grad((want_out * w).sum() + (softmax.finite(want_lse) * w_lse).sum(), (q, k, v))
        for g, wg in zip(got, want):
            assert rel_err(g, wg) <= 1e-8, rng.initial_seed()


@pytest.mark.parametrize("backend", ["flex", "naive"])
def test_flex_and_naive_return_the_log_sum_exp(backend, rng, softmax):
    """FlexAttention's own log-sum-exp (eager on CPU; the compiled CUDA path is not run here)."""
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=128, D=16)
    for layout in (block_layout(rng, 128), token_layout(rng, 128, holes_order(rng, 128))):
        if backend == "flex" and layout.kv_block == 1:
            continue
        want_out, want_lse = softmax.reference(q, k, v, layout.dense_mask(128, 128), 0.3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, lse, counts = block_sparse_attention(q, k, v, layout, scale=0.3, backend=backend, return_lse=True)
        assert counts["executor"] == backend
        assert rel_err(out, want_out) <= 1e-5
        softmax.assert_same_lse(lse, want_lse, 1e-5)
