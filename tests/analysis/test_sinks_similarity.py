"""analysis.sinks and analysis.head_similarity on planted attention maps, against loop references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnzoo import InvalidArgumentError
from attnzoo.analysis import head_similarity, layer_similarity, sinks

H, N = 4, 24


def causal_probs(rng, sink_positions: dict[int, list[int]], B: int = 2, bonus: float = 8.0) -> torch.Tensor:
    """(B, H, N, N) causal softmax of random logits, with ``bonus`` added to the keys listed per head."""
    logits = torch.randn(B, H, N, N, generator=rng)
    for head, keys in sink_positions.items():
        logits[:, head, :, keys] += bonus
    logits = logits.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
    return logits.softmax(dim=-1)


def loop_scores(p: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Mean attention received over the queries allowed to see each key, one key at a time."""
    B, heads, nq, nk = p.shape
    out = np.zeros((B, heads, nk))
    for b in range(B):
        for h in range(heads):
            for j in range(nk):
                seen = [p[b, h, q, j] for q in range(nq) if allowed[q, j]]
                out[b, h, j] = np.mean(seen) if seen else 0.0
    return out


def test_planted_sinks_are_found_first_and_later_tokens(rng):
    planted = {0: [0], 1: [0, 9], 2: [15], 3: []}
    p = causal_probs(rng, planted)
    p[:, :, -1] *= 0.5
    p[:, :, -1, -1] += 0.5  # the last query keeps half its attention on itself
    found = sinks(p, causal=True)
    for head, keys in planted.items():
        for b in range(2):
            assert set(keys) <= set(found.positions(head, b)), (head, b, found.positions(head, b))
    assert 9 in found.other_sinks() and 15 in found.other_sinks()
    assert found.head_fraction(0) >= 0.5
    reference = loop_scores(p.double().numpy(), np.tril(np.ones((N, N), dtype=bool)))
    np.testing.assert_allclose(found.score.numpy(), reference, rtol=1e-5, atol=1e-7)
    assert torch.equal(found.is_sink, found.score > 5.0 / N)
    assert found.is_sink[..., -1].any()  # the last key, seen only by itself, passes on its self-attention
    late = sinks(p, causal=True, min_queries=4)
    assert not late.is_sink[..., N - 3:].any() and torch.equal(late.is_sink[..., : N - 3], found.is_sink[..., : N - 3])


def test_even_attention_has_no_sink_and_mask_overrides_causal(rng):
    even = torch.ones(H, N, N) / N  # full attention, every key gets 1/N
    assert not sinks(even, causal=False).is_sink.any()
    window = torch.ones(N, N, dtype=torch.bool).tril() & ~torch.ones(N, N, dtype=torch.bool).tril(-4)
    logits = torch.randn(1, H, N, N, generator=rng).masked_fill(~window, float("-inf"))
    p = logits.softmax(-1)
    found = sinks(p, causal=True, mask=window, threshold=0.6)
    np.testing.assert_allclose(found.score.numpy(), loop_scores(p.double().numpy(), window.numpy()), rtol=1e-5, atol=1e-7)
    assert found.threshold == 0.6


def test_sinks_bad_input():
    p = torch.ones(H, N, N) / N
    with pytest.raises(InvalidArgumentError, match="probs"):
        sinks(torch.ones(N, N), causal=True)
    with pytest.raises(InvalidArgumentError, match="probs"):
        sinks(torch.ones(H, N, N, dtype=torch.long), causal=True)
    with pytest.raises(InvalidArgumentError, match="alpha"):
        sinks(p, causal=True, alpha=0.0)
    with pytest.raises(InvalidArgumentError, match="threshold"):
        sinks(p, causal=True, threshold=2.0)
    with pytest.raises(InvalidArgumentError, match="mask"):
        sinks(p, causal=True, mask=torch.ones(N, N - 1, dtype=torch.bool))


def js_pair(p: np.ndarray, q: np.ndarray) -> float:
    """Row-mean Jensen-Shannon divergence in bits through the two Kullback-Leibler terms."""
    def kl(x: np.ndarray, m: np.ndarray) -> float:
        return float(np.sum(np.where(x > 0, x * np.log2(np.where(x > 0, x, 1) / np.where(x > 0, m, 1)), 0.0)))

    return sum(0.5 * kl(a, 0.5 * (a + b)) + 0.5 * kl(b, 0.5 * (a + b)) for a, b in zip(p, q)) / len(p)


@pytest.mark.parametrize("metric", ["cosine", "js"])
def test_head_similarity_matches_pairwise_loop(rng, metric):
    layers = [causal_probs(rng, {0: [0]}, B=2) for _ in range(3)]
    layers[2] = layers[0].clone()  # layer 2 repeats layer 0
    sim = head_similarity(layers, metric=metric)
    assert sim.shape == (3, H, 3, H)
    flat = [m.double().numpy() for m in layers]
    for l, h, m, g in [(0, 0, 1, 2), (1, 3, 2, 1), (0, 1, 0, 3), (2, 2, 1, 2)]:
        values = []
        for b in range(2):
            x, y = flat[l][b, h], flat[m][b, g]
            values.append(float(np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y))) if metric == "cosine" else 1 - js_pair(x, y))
        assert sim[l, h, m, g].item() == pytest.approx(np.mean(values), abs=1e-5), (l, h, m, g)
    assert torch.allclose(sim, sim.permute(2, 3, 0, 1), atol=1e-6)
    by_layer = layer_similarity(layers, metric=metric)
    assert by_layer[0, 2].item() == pytest.approx(1.0, abs=1e-5)
    assert by_layer[0, 1].item() < 0.999
    assert torch.allclose(by_layer, torch.diagonal(sim, dim1=1, dim2=3).mean(-1))


def test_similarity_bad_input():
    p = torch.ones(H, N, N) / N
    with pytest.raises(InvalidArgumentError, match="maps"):
        head_similarity(p)
    with pytest.raises(InvalidArgumentError, match=r"maps\[1\]"):
        head_similarity([p, torch.ones(H, N - 1, N - 1)])
    with pytest.raises(InvalidArgumentError, match="metric"):
        head_similarity([p, p], metric="kl")
