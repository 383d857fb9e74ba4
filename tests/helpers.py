"""Shared test utilities (import as ``from helpers import ...``; tests/ is on sys.path via conftest)."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def qkv(gen: torch.Generator, B=2, Hq=4, Hkv=2, Nq=96, Nk=None, D=16, Dv=None, dtype=torch.float32, requires_grad=False):
    """Fresh random q (B,Hq,Nq,D), k (B,Hkv,Nk,D), v (B,Hkv,Nk,Dv)."""
    Nk = Nq if Nk is None else Nk
    Dv = D if Dv is None else Dv
    mk = lambda *s: torch.randn(*s, generator=gen).to(dtype).requires_grad_(requires_grad)  # noqa: E731
    return mk(B, Hq, Nq, D), mk(B, Hkv, Nk, D), mk(B, Hkv, Nk, Dv)
