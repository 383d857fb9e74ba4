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


class AttendWith:
    """``with AttendWith(model, attend):`` every attention layer of a transformers ``model`` attends
    with ``attend(layer index, q, k, v, scale)`` -> (B, Hq, Nq, Dv) (q post-RoPE (B, Hq, Nq, D), k
    and v (B, Hkv, Nk, D)), through attnzoo's capture hook: a test's own reference attention."""

    def __init__(self, model, attend):
        from attnzoo.integrations.transformers.adapter import attention_modules

        self.model, self.attend = model, attend
        self.modules = [layer.module for layer in attention_modules(model)]

    def __enter__(self):
        from attnzoo.integrations.transformers.adapter import CAPTURE_ATTR, install

        install(self.model, {})
        for index, module in enumerate(self.modules):
            setattr(module, CAPTURE_ATTR, lambda q, k, v, mask, causal, scale, plan, index=index: self.attend(index, q, k, v, scale))
        return self.model

    def __exit__(self, *exc):
        from attnzoo.integrations.transformers.adapter import CAPTURE_ATTR, unpatch

        for module in self.modules:
            delattr(module, CAPTURE_ATTR)
        unpatch(self.model)
