"""hedgehog with ``window`` (the LoLCATs hybrid) against its definition written out quadratically: query
i weighs key j by ``g e^(s_ij - m_i)`` inside the window (i - w < j <= i, m_i the window's largest logit)
and by ``(1 - g) phi(q_i) . phi(k_j)`` before it, one normalisation; and its recipe on a tiny llama."""

from __future__ import annotations

import pytest
import torch
from fidelity.mutation import Mutant, assert_caught
from fidelity.quadratic import assert_matches, expand_heads
from distill.test_harness import tiny_llama, tokens

import attnzoo
from attnzoo.distill import distill
from attnzoo.errors import UnsupportedError
from attnzoo.methods.learned import hedgehog

WINDOW = 7  # not a divisor of the 40 test tokens: a ragged last block of queries


def spiky(x, layer):
    z = x @ layer.weight.double() + layer.bias.double()
    return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], dim=-1)


def perturbed_hybrid(gen):
    m = attnzoo.get_method("hedgehog", window=WINDOW, chunk=16, width=5)
    m.materialize(4, 2, 8, 6)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.7 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return m


def check(gen):
    m = perturbed_hybrid(gen)
    fmap, share = m.feature_map, torch.sigmoid(m.window_factor.detach().double())

    def reference(q, k, v, *, causal, scale):
        heads, n = q.shape[1], q.shape[2]
        k, v = expand_heads(k, heads), expand_heads(v, heads)
        out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
        linear = spiky(q, fmap.query) @ spiky(k, fmap.key).transpose(-1, -2)
        logits = q @ k.transpose(-1, -2) * scale
        for i in range(n):
            recent = list(range(max(0, i - WINDOW + 1), i + 1))
            top = logits[:, :, i, recent].amax(-1, keepdim=True)
            weights = torch.zeros(q.shape[0], heads, n, dtype=torch.float64)
            weights[..., recent] = share[:, None] * torch.exp(logits[:, :, i, recent] - top)
            weights[..., : recent[0]] = (1 - share[:, None]) * linear[:, :, i, : recent[0]]
            out[:, :, i] = ((weights / weights.sum(-1, keepdim=True))[..., None] * v).sum(2)
        return out

    assert_matches(m, reference, gen, causal=True, label="hedgehog window")


def test_hybrid_matches_its_quadratic_definition(rng):
    check(rng)


@pytest.mark.parametrize("mutant", [
    Mutant("window-one-key-short", hedgehog, "window_terms", lambda q, k, v, w, scale: _window_terms(q, k, v, w - 1, scale)),
    Mutant("window-not-shifted-by-its-max", hedgehog, "window_terms", lambda q, k, v, w, scale: _unshifted(q, k, v, w, scale)),
], ids=lambda m: m.name)
def test_mutant_is_caught(mutant, monkeypatch, rng):
    assert_caught(monkeypatch, mutant, lambda: check(rng))


_window_terms = hedgehog.window_terms


def _unshifted(q, k, v, w, scale):
    """The window's terms as e^s_ij, without the max: the linear keys then weigh differently."""
    numerator, total = _window_terms(q, k, v, w, scale)
    top = (q @ k.transpose(-1, -2) * scale).masked_fill(~torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril(), float("-inf"))
    shift = torch.stack([top[:, :, i, max(0, i - w + 1): i + 1].amax(-1) for i in range(q.shape[2])], -1)[..., None]
    return numerator * shift.exp(), total * shift.exp()


def test_window_equal_to_the_length_is_softmax_attention(rng):
    m = attnzoo.get_method("hedgehog", window=40)
    q, k, v = torch.randn(1, 2, 40, 8, generator=rng), torch.randn(1, 2, 40, 8, generator=rng), torch.randn(1, 2, 40, 4, generator=rng)
    torch.testing.assert_close(m(q, k, v, causal=True), attnzoo.attention(q, k, v, "dense", causal=True), rtol=1e-5, atol=1e-6)


def test_hybrid_refuses_what_it_cannot_run(rng):
    m = attnzoo.get_method("hedgehog", window=4)
    q = torch.randn(1, 2, 16, 8, generator=rng)
    with pytest.raises(UnsupportedError, match="causal self-attention"):
        m(q, q, q, causal=False)
    with pytest.raises(UnsupportedError, match="causal self-attention"):
        m(q[:, :, :4], q, q, causal=True)


def test_hybrid_recipe_trains_the_window_factor_and_reloads(tmp_path, rng):
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    llama, data, probe = tiny_llama(), tokens(rng, 1), tokens(rng, 1)
    run = distill(llama, "hedgehog", data, tmp_path, steps=8, progress=False, window=8)
    assert run.metrics[-1]["output_mse"] < 0.95 * run.metrics[0]["output_mse"], run.metrics
    assert all(not torch.equal(m.window_factor, torch.zeros_like(m.window_factor)) for m in run.methods.values())
    with attnzoo.patch(llama, layers=dict(run.methods)):
        expected = llama(probe).logits
    with attnzoo.patch(llama, "hedgehog", weights=tmp_path):
        assert torch.equal(llama(probe).logits, expected)
