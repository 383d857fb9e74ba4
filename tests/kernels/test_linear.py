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

from attnzoo.errors import InvalidArgumentError
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
