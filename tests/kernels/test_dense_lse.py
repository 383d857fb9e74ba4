"""Dense attention with its log-sum-exp (kernels/dense.py) and the exact merge of attention over
disjoint key sets, against the float64 softmax written out plainly (the ``softmax`` fixture)."""

from __future__ import annotations

import pytest
import torch
from helpers import qkv, rel_err

from attnzoo.errors import InvalidArgumentError
from attnzoo.kernels.dense import attention_with_lse, exact_probabilities, merge_attention, sdpa


def causal_allowed(nq, nk):
    """Bottom-right aligned: query i sees key j <= i + nk - nq."""
    return torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)


def random_mask(gen, B, H, nq, nk, empty_row=3):
    """Random bool mask (B, H|1, Nq, Nk) with row ``empty_row`` masked everywhere."""
    mask = torch.rand(B, H, nq, nk, generator=gen) < 0.7
    mask[:, :, empty_row] = False
    return mask


SHAPES = [(40, 40), (17, 40), (40, 17)]


@pytest.mark.parametrize("nq,nk", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dv", [16, 8], ids=["fused", "explicit"])
def test_attention_with_lse_equals_plain_softmax(nq, nk, causal, masked, dv, rng, softmax):
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=nq, Nk=nk, D=16, Dv=dv)
    mask = random_mask(rng, 2, 1, nq, nk) if masked else None
    allowed = torch.ones(nq, nk, dtype=torch.bool) if mask is None else mask
    if causal:
        allowed = allowed & causal_allowed(nq, nk)
    want_out, want_lse = softmax.reference(q, k, v, allowed, 0.3)
    with torch.no_grad():
        out, lse = attention_with_lse(q, k, v, causal=causal, scale=0.3, mask=mask)
    assert out.shape == (2, 4, nq, dv) and lse.shape == (2, 4, nq)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert rel_err(out, want_out) <= 1e-5, rng.initial_seed()
    softmax.assert_same_lse(lse, want_lse, 1e-5)
    empty = torch.isneginf(want_lse)
    assert torch.all(out[empty] == 0)
    if masked or (causal and nq > nk):
        assert bool(empty.any())  # the case is exercised


def test_lse_dtypes_and_default_scale(rng, softmax):
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=12, D=16)
    out, lse = attention_with_lse(q.double(), k.double(), v.double())
    assert out.dtype == lse.dtype == torch.float64
    want_out, want_lse = softmax.reference(q, k, v, torch.ones(12, 12, dtype=torch.bool), 16**-0.5)
    assert rel_err(out, want_out) <= 1e-12 and rel_err(lse, want_lse) <= 1e-12
    out, lse = attention_with_lse(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert rel_err(lse, want_lse) <= 1e-2


@pytest.mark.parametrize("strided", ["q", "k", "v"])
def test_inputs_with_a_strided_last_dimension(strided, rng, softmax):
    """A (B, H, N, D) view whose last dimension is not unit-stride (a transposed layout) gives the
    same result as its contiguous copy: the fused CPU kernel alone would read it wrongly."""
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=12, D=8)
    tensors = {"q": q, "k": k, "v": v}
    tensors[strided] = tensors[strided].transpose(2, 3).contiguous().transpose(2, 3)
    assert tensors[strided].stride(-1) != 1
    out, lse = attention_with_lse(tensors["q"], tensors["k"], tensors["v"])
    want_out, want_lse = softmax.reference(q, k, v, torch.ones(12, 12, dtype=torch.bool), 8**-0.5)
    assert rel_err(out, want_out) <= 1e-5 and rel_err(lse, want_lse) <= 1e-5


@pytest.mark.parametrize("causal,nq,nk", [(True, 30, 30), (True, 20, 30), (False, 30, 20)])
def test_gradients_through_out_and_lse(causal, nq, nk, rng, softmax):
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=nq, Nk=nk, D=8, Dv=6, dtype=torch.float64, requires_grad=True)
    mask = random_mask(rng, 2, 4, nq, nk)
    allowed = mask & causal_allowed(nq, nk) if causal else mask
    w_out = torch.randn(2, 4, nq, 6, generator=rng, dtype=torch.float64)
    w_lse = torch.randn(2, 4, nq, generator=rng, dtype=torch.float64)

    def loss(out, lse):
        return (out * w_out).sum() + (softmax.finite(lse) * w_lse).sum()

    got = torch.autograd.grad(loss(*attention_with_lse(q, k, v, causal=causal, scale=0.4, mask=mask)), (q, k, v))
    want = torch.autograd.grad(loss(*softmax.reference(q, k, v, allowed, 0.4)), (q, k, v))
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert rel_err(g, w) <= 1e-10, rng.initial_seed()


def test_gradcheck_without_empty_rows(rng):
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, Nq=5, Nk=7, D=3, Dv=2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: attention_with_lse(a, b, c, causal=True), (q, k, v))


def split_keys(gen, parts, nk):
    """Each key in exactly one of ``parts`` random disjoint sets: (parts, Nk) bool."""
    owner = torch.randint(0, parts, (nk,), generator=gen)
    return owner[None, :] == torch.arange(parts)[:, None]


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("causal,nq,nk", [(True, 33, 33), (True, 20, 45), (False, 33, 21), (True, 45, 20)])
def test_merge_of_key_splits_equals_full_attention(parts, causal, nq, nk, rng, softmax):
    """Attention over random disjoint key sets, merged, equals attention over all keys (values and
    gradients, GQA); rows that no set reaches stay 0 / -inf."""
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=nq, Nk=nk, D=8, Dv=5, dtype=torch.float64, requires_grad=True)
    mask = random_mask(rng, 2, 4, nq, nk)
    sets = split_keys(rng, parts, nk)
    pieces = [attention_with_lse(q, k, v, causal=causal, scale=0.3, mask=mask & s) for s in sets]
    out, lse = merge_attention([p[0] for p in pieces], [p[1] for p in pieces])
    full_out, full_lse = attention_with_lse(q, k, v, causal=causal, scale=0.3, mask=mask)
    want_out, want_lse = softmax.reference(q, k, v, mask & causal_allowed(nq, nk) if causal else mask, 0.3)
    assert rel_err(out, want_out) <= 1e-12 and rel_err(full_out, want_out) <= 1e-12, rng.initial_seed()
    softmax.assert_same_lse(lse, want_lse, 1e-12)
    softmax.assert_same_lse(full_lse, want_lse, 1e-12)
    assert torch.all(out[torch.isneginf(want_lse)] == 0)
    w = torch.randn(out.shape, generator=rng, dtype=torch.float64)
    w_lse = torch.randn(lse.shape, generator=rng, dtype=torch.float64)
    got = torch.autograd.grad((out * w).sum() + (softmax.finite(lse) * w_lse).sum(), (q, k, v))
    want = torch.autograd.grad((want_out * w).sum() + (softmax.finite(want_lse) * w_lse).sum(), (q, k, v))
    for g, wg in zip(got, want):
        assert torch.isfinite(g).all()
        assert rel_err(g, wg) <= 1e-10, rng.initial_seed()


def test_merge_of_one_part_and_of_empty_parts(rng):
    out = torch.randn(2, 3, 4, generator=rng)
    lse = torch.randn(2, 3, generator=rng)
    lse[0, 1] = float("-inf")
    out[0, 1] = 0
    merged, merged_lse = merge_attention([out], [lse])
    assert rel_err(merged, out) <= 1e-6 and torch.equal(torch.isneginf(merged_lse), torch.isneginf(lse))
    none = torch.full_like(lse, float("-inf"))
    merged, merged_lse = merge_attention([out, out.zero_()], [none, none])
    assert torch.all(merged == 0) and torch.all(torch.isneginf(merged_lse))


def test_bad_arguments_are_named(rng):
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, Nq=6)
    with pytest.raises(InvalidArgumentError, match="mask: expected a bool tensor"):
        attention_with_lse(q, k, v, mask=torch.zeros(6, 6))
    with pytest.raises(InvalidArgumentError, match="mask: expected a shape broadcastable to"):
        attention_with_lse(q, k, v, mask=torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(InvalidArgumentError, match="q: expected a number of heads"):
        attention_with_lse(q[:, :1], k.expand(1, 2, 6, 16), v.expand(1, 2, 6, 16))
    out, lse = attention_with_lse(q, k, v)
    with pytest.raises(InvalidArgumentError, match="outs, lses"):
        merge_attention([out, out], [lse])
    with pytest.raises(InvalidArgumentError, match=r"outs\[1\], lses\[1\]"):
        merge_attention([out, out[:, :, :3]], [lse, lse])


@pytest.mark.parametrize("nq,nk", [(1, 40), (1, 1), (5, 40), (40, 40)])
def test_sdpa_bottom_right_causal_equals_plain_softmax(nq, nk, rng, softmax):
    """sdpa's causal alignment, including the one-query decode step it runs without a mask."""
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=nq, Nk=nk, D=16)
    want_out, _ = softmax.reference(q, k, v, causal_allowed(nq, nk), 0.3)
    with torch.no_grad():
        out = sdpa(q, k, v, causal=True, scale=0.3)
    assert rel_err(out, want_out) <= 1e-5, rng.initial_seed()


@pytest.mark.parametrize("nq,nk", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_exact_probabilities_in_chunks_are_the_plain_softmax(nq, nk, causal, chunk, rng):
    """Chunked rows (causal chunks compute only the keys their last row sees) against the float64
    softmax; rows that see no key are zeros."""
    q, k, _ = qkv(rng, 2, 4, 2, nq, nk, 8, dtype=torch.float64)
    mask = random_mask(rng, 1, 1, nq, nk)[0, 0]
    allowed = mask & causal_allowed(nq, nk) if causal else mask
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, dim=1)) * 0.3
    want = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    got = torch.cat([p for _, p in exact_probabilities(q, k, causal=causal, scale=0.3, chunk=chunk, mask=mask)], dim=2)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12), f"seed {rng.initial_seed()}"
