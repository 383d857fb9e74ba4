"""The shared linear executors against their quadratic references: causal/non-causal, decay,
GQA, bottom-right alignment, normalisation, gradients, dtypes, long-sequence stability, and the
Triton kernel under TRITON_INTERPRET=1."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import rel_err

from attnzoo.errors import InvalidArgumentError, UnsupportedError
from attnzoo.kernels.linear import linear_attention, naive_linear_attention, state_product


def features(gen, B=2, H=4, Hk=2, Nq=150, Nk=None, F=8, Dv=6, dtype=torch.float32, requires_grad=False):
    """Positive random features qf (B,H,Nq,F), kf (B,Hk,Nk,F) and values v (B,Hk,Nk,Dv)."""
    Nk = Nq if Nk is None else Nk
    mk = lambda *s, f=torch.rand: f(*s, generator=gen).to(dtype).requires_grad_(requires_grad)  # noqa: E731
    return mk(B, H, Nq, F), mk(B, Hk, Nk, F), mk(B, Hk, Nk, Dv, f=torch.randn)


DECAYS = [None, torch.tensor([0.5, 0.9, 0.99, 1.0])]
SHAPES = [(150, 150), (37, 150), (150, 37), (1, 1), (64, 64), (129, 200)]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("decay", DECAYS, ids=["no_decay", "decay"])
@pytest.mark.parametrize("nq,nk", SHAPES)
def test_chunked_causal_equals_naive(nq, nk, decay, normalize, rng):
    qf, kf, v = features(rng, Nq=nq, Nk=nk)
    for chunk, segment in ((16, 48), (64, 1024), (7, 7)):
        out = linear_attention(qf, kf, v, causal=True, decay=decay, normalize=normalize, chunk=chunk, segment=segment, backend="torch")
        ref = naive_linear_attention(qf, kf, v, causal=True, decay=decay, normalize=normalize)
        assert out.shape == (2, 4, nq, 6)
        assert rel_err(out, ref) <= 1e-5, (chunk, segment, rng.initial_seed())


@pytest.mark.parametrize("nq,nk", SHAPES[:3])
def test_non_causal_equals_naive(nq, nk, rng):
    qf, kf, v = features(rng, Nq=nq, Nk=nk)
    for normalize in (True, False):
        out = linear_attention(qf, kf, v, causal=False, normalize=normalize)
        assert rel_err(out, naive_linear_attention(qf, kf, v, causal=False, normalize=normalize)) <= 1e-5


@pytest.mark.parametrize("causal,decay", [(False, None), (True, None), (True, DECAYS[1])])
def test_gradients_equal_naive(causal, decay, rng):
    qf, kf, v = features(rng, Nq=70, Nk=90, dtype=torch.float64, requires_grad=True)
    out = linear_attention(qf, kf, v, causal=causal, decay=decay, chunk=16, segment=32)
    ref = naive_linear_attention(qf, kf, v, causal=causal, decay=decay)
    grad = torch.randn(out.shape, generator=rng, dtype=torch.float64)
    got = torch.autograd.grad(out, (qf, kf, v), grad)
    want = torch.autograd.grad(ref, (qf, kf, v), grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype, rng):
    qf, kf, v = features(rng, Nq=300, dtype=dtype)
    out = linear_attention(qf, kf, v, causal=True, chunk=32)
    assert out.dtype == torch.float32
    assert rel_err(out, naive_linear_attention(qf.float(), kf.float(), v.float(), causal=True)) <= 1e-5


def test_causal_rows_only_see_the_past(rng):
    """Changing key/value j changes only rows i >= j (bottom-right aligned)."""
    qf, kf, v = features(rng, Nq=100, Nk=120)
    out = linear_attention(qf, kf, v, causal=True, decay=DECAYS[1], chunk=16)
    v2 = v.clone()
    v2[:, :, 70] += 1.0
    changed = (linear_attention(qf, kf, v2, causal=True, decay=DECAYS[1], chunk=16) - out).abs().amax(dim=(0, 1, 3)) > 0
    assert not changed[: 70 - 20].any() and changed[70 - 20:].all()


def test_long_sequence_float32_matches_float64():
    """N = 2^20 causal (2^16 with decay): float32 accumulation stays within 1e-4 of the same
    computation in float64, though the normaliser grows to ~N."""
    gen = torch.Generator().manual_seed(0)
    for n, decay in ((1 << 20, None), (1 << 16, torch.tensor([0.999]))):
        qf, kf = torch.rand(1, 1, n, 8, generator=gen), torch.rand(1, 1, n, 8, generator=gen)
        v = torch.randn(1, 1, n, 4, generator=gen)
        out = linear_attention(qf, kf, v, causal=True, decay=decay, segment=1 << 18)
        ref = linear_attention(qf.double(), kf.double(), v.double(), causal=True, decay=decay, segment=1 << 18)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) <= 1e-4


def test_bad_arguments_are_named(rng):
    qf, kf, v = features(rng, Nq=10)
    with pytest.raises(InvalidArgumentError, match="decay"):
        linear_attention(qf, kf, v, causal=True, decay=torch.tensor([0.5, 1.5, 1.0, 1.0]))
    with pytest.raises(InvalidArgumentError, match="backend"):
        state_product(qf, kf, v, causal=True, backend="cuda")


def plain_state(kf, v, decay, normalize, heads):
    """Float64 ``sum_j lambda^(N-1-j) phi(k_j)^T [v_j, 1]`` over all N keys, per state head."""
    kf, v = kf.double().repeat_interleave(heads // kf.shape[1], 1), v.double().repeat_interleave(heads // v.shape[1], 1)
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    n = kf.shape[2]
    weights = torch.ones(heads, n, dtype=torch.float64) if decay is None else decay.double()[:, None] ** torch.arange(n - 1, -1, -1)
    return torch.einsum("bhnf,bhnd,hn->bhfd", kf, v, weights)


@pytest.mark.parametrize("decay", DECAYS, ids=["no_decay", "decay"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("cuts", [(0, 70, 150), (0, 37, 101, 150)], ids=["two", "three"])
def test_state_carries_a_causal_sequence_across_calls(decay, normalize, heads, cuts, rng):
    """Two or three calls passing the state equal one call: outputs, the final state (also against
    its definition) and gradients; pieces cut inside chunks and segments."""
    H, Hk = heads
    qf, kf, v = features(rng, H=H, Hk=Hk, Nq=150, dtype=torch.float64, requires_grad=True)
    opts = dict(causal=True, decay=decay, normalize=normalize, chunk=16, segment=48)
    full, full_state = linear_attention(qf, kf, v, **opts, return_state=True)
    outs, state = [], None
    for a, b in zip(cuts[:-1], cuts[1:]):
        out, state = linear_attention(qf[:, :, a:b], kf[:, :, a:b], v[:, :, a:b], **opts, initial_state=state, return_state=True)
        outs.append(out)
    state_heads = H if decay is not None else Hk
    assert state.shape == (2, state_heads, 8, 6 + normalize)
    assert rel_err(torch.cat(outs, dim=2), full) <= 1e-12, rng.initial_seed()
    assert rel_err(state, full_state) <= 1e-12
    assert rel_err(state, plain_state(kf, v, decay, normalize, state_heads)) <= 1e-12
    w = torch.randn(full.shape, generator=rng, dtype=torch.float64)
    w_state = torch.randn(state.shape, generator=rng, dtype=torch.float64)
    got = torch.autograd.grad((torch.cat(outs, dim=2) * w).sum() + (state * w_state).sum(), (qf, kf, v))
    want = torch.autograd.grad((full * w).sum() + (full_state * w_state).sum(), (qf, kf, v))
    for g, wg in zip(got, want):
        assert rel_err(g, wg) <= 1e-10


@pytest.mark.parametrize("decay", DECAYS, ids=["no_decay", "decay"])
def test_state_continues_into_a_call_with_fewer_queries_than_keys(decay, rng):
    """A later call may have Nq < Nk (bottom-right aligned): its queries see the state and its keys."""
    qf, kf, v = features(rng, Nq=120)
    full = linear_attention(qf, kf, v, causal=True, decay=decay, chunk=16)
    _, state = linear_attention(qf[:, :, :50], kf[:, :, :50], v[:, :, :50], causal=True, decay=decay, chunk=16, return_state=True)
    tail = linear_attention(qf[:, :, 100:], kf[:, :, 50:], v[:, :, 50:], causal=True, decay=decay, chunk=16, initial_state=state)
    assert rel_err(tail, full[:, :, 100:]) <= 1e-5, rng.initial_seed()


@pytest.mark.parametrize("normalize", [True, False])
def test_non_causal_state_adds_the_earlier_keys(normalize, rng):
    qf, kf, v = features(rng, Nq=40, Nk=90, dtype=torch.float64)
    full = linear_attention(qf, kf, v, causal=False, normalize=normalize)
    _, state = state_product(qf, kf[:, :, :60], v[:, :, :60], causal=False, append_ones=normalize, return_state=True)
    out, state = linear_attention(qf, kf[:, :, 60:], v[:, :, 60:], causal=False, normalize=normalize, initial_state=state,
                                  return_state=True)
    assert rel_err(out, full) <= 1e-12
    assert rel_err(state, plain_state(kf, v, None, normalize, 2)) <= 1e-12


def test_bad_states_are_named(rng):
    qf, kf, v = features(rng, Nq=30)
    _, state = linear_attention(qf, kf, v, causal=True, return_state=True)
    with pytest.raises(InvalidArgumentError, match=r"initial_state: expected a tensor of shape \(2, 4, 8, 7\)"):
        linear_attention(qf, kf, v, causal=True, decay=DECAYS[1], initial_state=state)  # decay: one per query head
    with pytest.raises(InvalidArgumentError, match=r"initial_state: expected a tensor of shape \(2, 2, 8, 6\)"):
        linear_attention(qf, kf, v, causal=True, normalize=False, initial_state=state)
    with pytest.raises(UnsupportedError, match="initial_state: expected Nq <= Nk"):
        linear_attention(qf, kf[:, :, :20], v[:, :, :20], causal=True, initial_state=state)
    with pytest.raises(InvalidArgumentError, match="decay: expected None with causal=False"):
        linear_attention(qf, kf, v, causal=False, decay=DECAYS[1])


TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from attnzoo.kernels.linear import state_product
    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())
    gen = torch.Generator().manual_seed(int(SEED))
    for nq, decay in ((70, None), (45, torch.tensor([0.9, 0.99, 1.0, 0.5]))):
        q = torch.rand(1, 4, nq, 16, generator=gen, requires_grad=True)
        k = torch.rand(1, 2, nq, 16, generator=gen, requires_grad=True)
        v = torch.randn(1, 2, nq, 9, generator=gen, requires_grad=True)
        out = state_product(q, k, v, causal=True, decay=decay, chunk=16, backend="triton")
        ref = state_product(q, k, v, causal=True, decay=decay, chunk=16, backend="torch")
        assert rel(out, ref) <= 1e-5, ("forward", nq, rel(out, ref))
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        want = torch.autograd.grad(ref.sum(), (q, k, v))
        assert all(rel(g, w) <= 1e-5 for g, w in zip(grads, want)), "backward"
        # continuing from a state and returning one (ragged last chunk: nq is no multiple of 16)
        s0 = torch.rand(1, 2 if decay is None else 4, 16, 10, generator=gen, requires_grad=True)
        kw = dict(causal=True, decay=decay, chunk=16, append_ones=True, initial_state=s0, return_state=True)
        out, state = state_product(q, k, v, backend="triton", **kw)
        ref, ref_state = state_product(q, k, v, backend="torch", **kw)
        assert rel(out, ref) <= 1e-5 and rel(state, ref_state) <= 1e-5, ("state forward", nq)
        grads = torch.autograd.grad(out.sum() + state.sum(), (q, k, v, s0))
        want = torch.autograd.grad(ref.sum() + ref_state.sum(), (q, k, v, s0))
        assert all(rel(g, w) <= 1e-5 for g, w in zip(grads, want)), "state backward"
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)")
def test_triton_kernel_matches_torch_executor_under_interpreter(rng):
    """Runs in a subprocess: TRITON_INTERPRET must be set before the kernel is decorated."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    script = TRITON_SCRIPT.replace("SEED", str(rng.initial_seed() % 2**31))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
