"""Fixtures shared by the executor tests."""

from __future__ import annotations

import pytest
import torch


def plain_softmax(q, k, v, allowed, scale):
    """Float64 attention written out plainly: each query head uses key head h // groups, logits
    masked to -inf where ``allowed`` (broadcastable to (B, Hq, Nq, Nk)) is False; returns the
    output (0 for rows with no allowed key) and each row's natural log-sum-exp (-inf there)."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return probs @ v, lse


def finite(lse):
    """-inf entries as 0, so a log-sum-exp can enter a loss."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def assert_same_lse(got, want, tol):
    """Equal -inf pattern, finite entries within ``tol``."""
    assert got.shape == want.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    assert float((finite(got).detach().double() - finite(want).detach()).abs().amax()) <= tol


class Softmax:
    reference = staticmethod(plain_softmax)
    finite = staticmethod(finite)
    assert_same_lse = staticmethod(assert_same_lse)


@pytest.fixture
def softmax():
    """The plain float64 softmax reference and its log-sum-exp helpers (``.reference``,
    ``.finite``, ``.assert_same_lse``)."""
    return Softmax
