"""analysis.lrp (AttnLRP) and analysis.sr_map on tiny random-init llama and bert models."""

from __future__ import annotations

import pytest
import torch
from analysis.tiny_models import N, ids, tiny

import attnzoo
from attnzoo import InvalidArgumentError, UnsupportedError
from attnzoo.analysis import lrp, sr_map
from attnzoo.analysis.lrp import uniform_product

transformers = pytest.importorskip("transformers")


def with_biases(model):
    """Give every zero-initialised bias a random value (they absorb relevance)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_cp_rule_conserves_relevance_exactly_at_every_block(family, rng):
    """With attention held constant every remaining rule (norms, gated MLP, residuals) conserves."""
    model, x = tiny(family), ids(rng, B=2)
    with torch.no_grad():
        reference = model(input_ids=x).logits[:, -1]
    rel = lrp(model, x, rule="cp")
    torch.testing.assert_close(rel.logit, reference.gather(-1, rel.target[:, None])[:, 0])  # the forward pass is unchanged
    assert torch.equal(rel.target, reference.argmax(-1))
    assert rel.layers.shape == (2, 2)
    torch.testing.assert_close(rel.layers, rel.logit[:, None].expand(2, 2), atol=1e-5, rtol=1e-4)
    assert rel.conservation_error().max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_attnlrp_conserves_within_the_softmax_gap(family, rng):
    """Explaining the predicted logit (a logit near zero makes any relative gap large)."""
    model, x = tiny(family), ids(rng, B=3)
    rel = lrp(model, x, position=4)
    gaps = (rel.layers - rel.logit[:, None]).abs() / rel.logit.abs()[:, None]
    # the softmax rule's bias term: 2-25% here (random weights, logits ~0.3); dropping the uniform rule doubles the totals
    assert gaps.max() < 0.5, gaps
    assert not torch.allclose(rel.tokens, lrp(model, x, position=4, rule="cp").tokens)
    chosen = lrp(model, x, target=5, position=4)
    with torch.no_grad():
        torch.testing.assert_close(chosen.logit, model(input_ids=x).logits[:, 4, 5])
    assert chosen.position == 4 and chosen.target.tolist() == [5, 5, 5]


def test_biases_absorb_relevance(rng):
    model, x = with_biases(tiny("bert")), ids(rng)
    assert lrp(model, x, rule="cp").conservation_error().item() > 1e-3


def test_uniform_rule_halves_relevance_between_factors(rng):
    a, b = torch.randn(3, 4, generator=rng, requires_grad=True), torch.randn(4, 5, generator=rng, requires_grad=True)
    g = torch.randn(3, 5, generator=rng)
    ga, gb = torch.autograd.grad(uniform_product(a, b, matmul=True), (a, b), g)
    out_relevance = ((a @ b) * g).sum()
    torch.testing.assert_close((a * ga).sum(), 0.5 * out_relevance)
    torch.testing.assert_close((b * gb).sum(), 0.5 * out_relevance)


def test_lrp_on_a_patched_model_gives_no_relevance_beyond_the_window(rng):
    model, x = tiny("llama"), ids(rng)
    unpatched = lrp(model, x).tokens[0]
    attnzoo.patch(model, attnzoo.get_method("sliding_window", window=3))
    try:
        patched = lrp(model, x).tokens[0]
    finally:
        attnzoo.unpatch(model)
    reach = 2 * 2  # two layers, each reaching 2 keys back
    assert patched[: N - 1 - reach].abs().max() == 0 and unpatched[: N - 1 - reach].abs().max() > 0
    assert model.config._attn_implementation == "sdpa"


def test_lrp_bad_input(rng):
    model = tiny("llama")
    with pytest.raises(InvalidArgumentError, match="target"):
        lrp(model, ids(rng), target=10_000)
    with pytest.raises(InvalidArgumentError, match="position"):
        lrp(model, ids(rng), position=N)
    with pytest.raises(InvalidArgumentError, match="rule"):
        lrp(model, ids(rng), rule="z")
    model.train()
    with pytest.raises(InvalidArgumentError, match="eval"):
        lrp(model, ids(rng))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=97, n_positions=32))
    with pytest.raises(UnsupportedError):
        lrp(gpt2.eval(), ids(rng))


def test_sr_map_marks_the_area_around_an_isolated_focus():
    tokens = torch.zeros(1, 30)
    tokens[0, 12] = 1.0
    tokens[0, 25] = 0.1
    sr = sr_map(tokens)
    assert sr.shape == tokens.shape and sr.max() == 1.0 and sr.min() >= 0
    assert sr[0].argmax().item() in (11, 12, 13)
    assert sr[0, 10:15].mean() > sr[0, 20:30].mean()
    grid = torch.zeros(2, 8, 8)
    grid[0, 2, 5] = 1.0
    grid[1, 6, 1] = 2.0
    sr2 = sr_map(grid)
    for b, (i, j) in enumerate([(2, 5), (6, 1)]):
        row, col = divmod(sr2[b].argmax().item(), 8)
        assert abs(row - i) <= 1 and abs(col - j) <= 1
    assert sr_map(torch.ones(1, 10)).abs().max() == 0  # nothing stands out


def test_sr_map_bad_input():
    with pytest.raises(InvalidArgumentError, match="relevance"):
        sr_map(torch.ones(3))
    with pytest.raises(InvalidArgumentError, match="relevance"):
        sr_map(torch.ones(1, 1))
    with pytest.raises(InvalidArgumentError, match="radii"):
        sr_map(torch.ones(1, 5), radii=())
