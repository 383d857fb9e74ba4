"""analysis.normgrad, rank, token_importance and verbalize against closed forms and loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attnzoo import InvalidArgumentError
from attnzoo.analysis import (
    effective_rank,
    normgrad,
    numerical_rank,
    rank,
    token_importance,
    verbalize,
)


def test_normgrad_of_a_pooled_linear_head_is_activation_norm_times_weight_norm(rng):
    """Logits = W mean_pool(relu(conv x)): the gradient at the relu output is W[t] / (H W) everywhere."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)).eval()
    x = torch.randn(2, 3, 6, 7, generator=rng)
    out = normgrad(model, x, ["1"], target=[2])["1"]
    with torch.no_grad():
        act = model[1](model[0](x))
    expected = act.norm(dim=1) * model[4].weight[2].norm() / 42
    torch.testing.assert_close(out, expected)
    assert out.shape == (2, 6, 7)


def test_normgrad_on_vit_tokens_and_bad_input(rng):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=48, num_labels=3)
    model = transformers.ViTForImageClassification(config).eval()
    pixels = torch.randn(1, 3, 16, 16, generator=rng)
    out = normgrad(model, {"pixel_values": pixels}, ["vit.layers.1"])["vit.layers.1"]
    assert out.shape == (1, 17) and (out >= 0).all() and out.sum() > 0
    with pytest.raises(InvalidArgumentError, match="layers"):
        normgrad(model, {"pixel_values": pixels}, ["vit.nope"])
    with pytest.raises(InvalidArgumentError, match="target"):
        normgrad(model, {"pixel_values": pixels}, ["vit.layers.1"], target=3)


def test_ranks_of_known_matrices(rng):
    a, b = torch.randn(2, 10, 3, generator=rng), torch.randn(2, 3, 8, generator=rng)
    assert numerical_rank(a @ b).tolist() == [3, 3]
    assert effective_rank(torch.eye(6)).item() == pytest.approx(6.0)
    assert effective_rank(torch.diag(torch.tensor([1.0, 0, 0]))).item() == pytest.approx(1.0)
    s = np.array([3.0, 1.0])
    p = s / s.sum()
    assert effective_rank(torch.diag(torch.tensor(s))).item() == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))


def test_rank_report_matches_a_loop_and_separates_low_rank_buffers(rng):
    B, Hq, Hkv, N, D = 1, 4, 2, 40, 8
    q, k, v = (torch.randn(B, h, N, D, generator=rng) for h in (Hq, Hkv, Hkv))
    report = rank(q, k, v, causal=True)
    phi = lambda x: torch.where(x > 0, x + 1, torch.exp(x))
    for h in range(Hkv):
        kv = sum(torch.outer(phi(k[0, h, j]).double(), v[0, h, j].double()) for j in range(N))
        assert report.kv_effective[0, h].item() == pytest.approx(effective_rank(kv).item(), rel=1e-5)
    scores = (q[0, 3] @ k[0, 1].T) / D ** 0.5
    scores = scores.masked_fill(torch.ones(N, N).triu(1).bool(), float("-inf"))
    out = scores.double().softmax(-1) @ v[0, 1].double()
    assert report.output_effective[0, 3].item() == pytest.approx(effective_rank(out).item(), rel=1e-5)
    assert report.bound == D and report.summary()["kv_numerical"] <= D
    low = rank(q, k, v[..., :1] * torch.randn(D, generator=rng), causal=False)  # values along one direction
    assert (low.kv_numerical == 1).all()
    with pytest.raises(InvalidArgumentError, match="q, k, v"):
        rank(q, k[..., :4], v, causal=True)


def test_token_importance_is_the_mean_column_sum(rng):
    maps = [torch.randn(2, 3, 5, 5, generator=rng).softmax(-1) for _ in range(2)]
    got = token_importance(maps, normalize=False)
    expected = np.zeros((2, 5))
    for m in maps:
        for h in range(3):
            expected += m[:, h].double().numpy().sum(axis=1) / 6
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    torch.testing.assert_close(token_importance(maps).sum(-1), torch.ones(2))


def test_verbalize_names_what_the_scores_say():
    tokens = ["[CLS]", "not", "a", "good", "movie", "at", "all"]
    scores = [5.0, -0.4, 0.0, 0.3, 0.5, 0.1, 0.1]
    text = verbalize(tokens, scores, top=2, prediction="negative", skip=["[CLS]"])
    assert text.startswith("The prediction 'negative' rests most on 'movie' (50%), 'good' (30%)")
    assert "'good movie' (tokens 3-4) matters as a whole" in text
    assert "'not' (token 1) speaks most against it" in text and "CLS" not in text
    assert verbalize(["a", "b"], [-1.0, 0.0]) == "No token supports the prediction."
    bpe = verbalize(["The", "Ġcapital", "Ġof", "ĠItaly", "Ġis"], [0.1, 0.0, 0.2, 0.9, 0.5], top=2, prediction="ĠRome")
    assert bpe.startswith("The prediction 'Rome' rests most on 'Italy' (53%), 'is' (29%)") and "'Italy is' (tokens 3-4)" in bpe
    assert "'playing' (tokens 1-2)" in verbalize(["[CLS]", "play", "##ing"], [0.0, 1.0, 1.0], skip=["[CLS]"])
    with pytest.raises(InvalidArgumentError, match="scores"):
        verbalize(tokens, scores[:3])
