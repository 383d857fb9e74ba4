"""`inline` (arXiv 2412.06590, Eq. 5 with the official code's scale / N) against ``W_ij = (scale /
n_i) (phi(q_i) . phi(k_j) - (1/n_i) sum_s phi(q_i) . phi(k_s)) + 1 / n_i`` over the n_i visible
keys, plus the local residual: softmax attention over the ``window`` keys around the query
(centred; the most recent when causal)."""

from __future__ import annotations

import torch
from fidelity.mutation import Mutant
from fidelity.quadratic import (
    assert_matches,
    distance,
    elu_plus_one,
    expand_heads,
    fidelity_tests,
    visible,
)

import attnzoo
from attnzoo.methods.linear import inline as inline_module

InLine = inline_module.InLine
INLINE = InLine._inline  # the unpatched term, for the mutant that wraps it


def reference(q, k, v, *, causal, scale, phi, window):
    heads, nq, nk = q.shape[1], q.shape[2], k.shape[2]
    k, v = expand_heads(k, heads), expand_heads(v, heads)
    seen = visible(nq, nk, causal)
    n = seen.sum(-1, keepdim=True).clamp_min(1).double()
    scores = (phi(q) @ phi(k).transpose(-1, -2)) * seen
    weights = ((scores - scores.sum(-1, keepdim=True) / n) * (scale / n) + 1 / n) * seen
    out = weights @ v
    if window:
        before = distance(nq, nk)  # keys j in [p - left, p + right] of query position p
        left = window - 1 if causal else (window - 1) // 2
        right = 0 if causal else window - 1 - left
        near = (before <= left) & (before >= -right)
        logits = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~near, float("-inf"))
        out = out + torch.softmax(logits, dim=-1) @ v
    return out


def check(gen):
    for cfg, phi in ((dict(), lambda x: x), (dict(feature_map="elu", window=0), elu_plus_one)):
        m = attnzoo.get_method("inline", chunk=16, **cfg)
        window = m.config.window
        ref = lambda q, k, v, phi=phi, window=window, **kw: reference(q, k, v, phi=phi, window=window, **kw)  # noqa: E731
        for causal in (False, True):
            assert_matches(m, ref, gen, causal=causal, label=f"inline {cfg}")
        assert_matches(m, ref, gen, causal=True, label=f"inline {cfg} cross", Nq=24, Nk=40)


def without_scale_over_n(self, q, k, v, call, product):
    """The review's finding: the injective term without scale / n (queries scaled by n / scale,
    which undoes the factor for the linear feature maps; elu + 1 is changed too)."""
    return INLINE(self, q * (InLine._visible(call, q) / call.scale).to(q.dtype), k, v, call, product)


MUTANTS = [
    Mutant("no-scale-over-n", InLine, "_inline", without_scale_over_n),
    Mutant("no-local-residual", InLine, "_with_local", lambda self, out, q, k, v, call, reference: out.to(q.dtype)),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
