"""MoA's profiling search: the dropped attention mass against loops, the attention influence against
the gradient through an explicit attention matrix and against the loss change of really masking an
entry, a head that cannot matter given the smallest span, the MILP against brute force, the config
patch loads."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import AttendWith

import attnzoo
from attnzoo import InvalidArgumentError
from attnzoo.cache.moa_search import MoAProfile, attention_influence, choose_rules, dropped_mass, moa_profile, moa_search, rule_spans

pytest.importorskip("scipy")


def causal_probs(rng, heads=2, n=12):
    logits = torch.randn(heads, n, n, generator=rng)
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(logits, dim=-1)


def test_dropped_mass_matches_loops(rng):
    probs = causal_probs(rng)
    lengths, sinks = [6, 12], 2
    rules, spans = rule_spans([0, 3], [0.0, 0.5], lengths)
    got = dropped_mass(probs, spans, lengths, sinks)
    for h in range(2):
        for r in range(len(rules)):
            expected = 0.0
            for l, n in enumerate(lengths):
                span = int(spans[r, l])
                lost = [sum(float(probs[h, i, j]) for j in range(i + 1) if not (j < sinks or j > i - span)) for i in range(n)]
                expected += sum(lost) / n
            assert got[h, r] == pytest.approx(expected, abs=1e-6)  # probs are float32


def small_llama(dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval().to(dtype)


def explicit_attention(masked, probs):
    """An ``attend`` for :class:`helpers.AttendWith`: an explicit causal softmax matrix A, kept in
    ``probs`` {layer: A} with its gradient retained, the logit of entry ``masked`` (layer, head, i,
    j) set to -inf when given."""

    def attend(index, q, k, v, scale):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        n = q.shape[2]
        logits = (q @ k.transpose(-1, -2)) * scale
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        if masked is not None and masked[0] == index:
            _, head, i, j = masked
            logits = logits.clone()
            logits[0, head, i, j] = float("-inf")
        probs[index] = torch.softmax(logits, dim=-1)
        if probs[index].requires_grad:
            probs[index].retain_grad()
        return probs[index] @ v

    return attend


def mean_loss(model, ids, masked=None, grads=False):
    """(mean next-token cross-entropy, {layer: A}) through :func:`explicit_attention`."""
    probs = {}
    with AttendWith(model, explicit_attention(masked, probs)), torch.set_grad_enabled(grads):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(grads)
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return loss, probs


def test_influence_matches_the_gradient_through_an_explicit_attention_matrix(rng):
    """MoA's influence |A_ij (sum_k A_ik G_ik - G_ij) / (1 - A_ij)|, G = dL/dA taken through an
    explicit softmax matrix, written entry by entry, equals the fast path's (G = dL/dO v^T)."""
    model = small_llama(torch.float64)
    ids = torch.randint(0, 97, (1, 12), generator=rng)
    got = dict(attention_influence(model, ids))
    loss, probs = mean_loss(model, ids, grads=True)
    grads = torch.autograd.grad(loss, [probs[i] for i in sorted(probs)])
    for index, g in zip(sorted(probs), grads):
        a, g = probs[index][0].detach(), g[0]
        expected = torch.zeros_like(a)
        for h in range(a.shape[0]):
            for i in range(a.shape[1]):
                row = sum(float(a[h, i, k] * g[h, i, k]) for k in range(i + 1))
                for j in range(i + 1):
                    if a[h, i, j] < 1:
                        expected[h, i, j] = abs(float(a[h, i, j]) * (row - float(g[h, i, j])) / (1 - float(a[h, i, j])))
        assert torch.allclose(got[index], expected, rtol=1e-6, atol=1e-12), index


def test_influence_predicts_the_loss_rise_of_masking_one_entry(rng):
    """Known answer: for the entries of largest influence among those holding at most a fifth of
    their row (where a first-order estimate holds), really masking the entry (logit -inf, the row
    renormalised by the softmax) changes the model's loss by about the influence."""
    model = small_llama(torch.float64)
    ids = torch.randint(0, 97, (1, 16), generator=rng)
    base, probs = mean_loss(model, ids)
    effects = dict(attention_influence(model, ids))
    for index, effect in effects.items():
        flat = effect.masked_fill(probs[index][0] > 0.2, 0).flatten().topk(3).indices
        for position in flat.tolist():
            head, rest = divmod(position, 16 * 16)
            i, j = divmod(rest, 16)
            masked, _ = mean_loss(model, ids, masked=(index, head, i, j))
            predicted = float(effect[head, i, j])
            assert abs(float(masked - base)) == pytest.approx(predicted, rel=0.1), (index, head, i, j)


def test_the_gradient_search_gives_a_head_that_cannot_matter_the_smallest_span(rng):
    """Planted: KV group 0's query heads of layer 0 write nothing (their o_proj columns are zero),
    so masking their attention cannot change the loss: the gradient-weighted search gives that
    group the smallest span at every length, while it still drops attention mass there."""
    model = small_llama()
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        attention.o_proj.weight[:, : 2 * attention.head_dim] = 0  # query heads 0 and 1 = KV head 0 (groups of 2)
    ids = torch.randint(0, 97, (1, 64), generator=rng)
    grid = {"density": 0.25, "alphas": (0, 8, 16), "betas": (0.0, 0.125, 0.25, 0.5), "sinks": 2, "kv_groups": True}
    found = moa_search(model, ids, **grid)
    _, spans = rule_spans(grid["alphas"], grid["betas"], found["search"]["lengths"])
    rules = found["search"]["rules"]["0"]
    chosen = rule_spans([rules[0][0]], [rules[0][1]], found["search"]["lengths"])[1][0]
    assert (chosen == spans.min(axis=0)).all(), rules
    mass = moa_search(model, ids, loss="mass", **grid)["search"]["rules"]["0"]
    assert rule_spans([mass[0][0]], [mass[0][1]], found["search"]["lengths"])[1][0].sum() > spans.min(axis=0).sum(), mass


def test_milp_choice_is_the_brute_force_optimum(rng):
    gen = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=rng)))
    losses = gen.random((3, 4))
    spans = gen.integers(1, 10, size=(4, 2)).astype(float)
    limits = np.array([15.0, 16.0])
    best = min((c for c in itertools.product(range(4), repeat=3) if all(sum(spans[r, l] for r in c) <= limits[l] for l in range(2))),
               key=lambda c: sum(losses[h, r] for h, r in enumerate(c)), default=None)
    if best is None:
        with pytest.raises(InvalidArgumentError):
            choose_rules(losses, spans, limits)
        return
    picks = choose_rules(losses, spans, limits)
    assert sum(losses[h, r] for h, r in enumerate(picks)) == pytest.approx(sum(losses[h, r] for h, r in enumerate(best)))


def test_search_writes_a_config_patch_runs(rng, tmp_path):
    model = small_llama()
    ids = torch.randint(0, 97, (1, 64), generator=rng)
    found = moa_search(model, ids, density=0.25, alphas=(0, 8), betas=(0.0, 0.125, 0.25), sinks=4, path=tmp_path / "moa.json")
    assert found["search"]["loss_total"] <= found["search"]["loss_total_uniform"] + 1e-9
    with attnzoo.patch(model, "auto", config=str(tmp_path / "moa.json")):
        out = model(input_ids=ids).logits
    assert torch.isfinite(out).all()
    with pytest.raises(InvalidArgumentError):
        moa_search(model, ids, density=0.0)
    pair = torch.randint(0, 97, (2, 32), generator=rng)  # two calibration sequences: their losses add up
    grid = {"density": 0.25, "alphas": (0, 8), "betas": (0.0, 0.25), "sinks": 4}
    for loss in ("gradient", "mass"):
        both = moa_search(model, pair, loss=loss, **grid)["search"]["loss_total_uniform"]
        each = sum(moa_search(model, pair[i:i + 1], loss=loss, **grid)["search"]["loss_total_uniform"] for i in range(2))
        assert both == pytest.approx(each, rel=1e-6), loss
    profile = moa_profile(model, pair, loss="mass", alphas=(0, 8), betas=(0.0, 0.25), sinks=4, densities=[0.2])
    for density in (0.25, 0.2):  # one profile, several budgets: the searches a fresh profile gives
        again = moa_search(model, pair, density=density, loss="mass", alphas=(0, 8), betas=(0.0, 0.25), sinks=4)
        assert moa_search(model, profile=profile, density=density)["search"] == again["search"], density
    profile.save(tmp_path / "profile.json")
    loaded = MoAProfile.load(tmp_path / "profile.json")  # a saved profile searches the same
    assert moa_search(model, profile=loaded, density=0.2)["search"] == moa_search(model, profile=profile, density=0.2)["search"]
    with pytest.raises(InvalidArgumentError) as e:
        MoAProfile.load(tmp_path / "moa.json")  # a config, not a profile
    assert e.value.argument == "path"
    for bad in ({"profile": profile, "density": 0.3}, {"profile": profile, "density": 0.25, "sinks": 2}, {"density": 0.25}):
        with pytest.raises(InvalidArgumentError):
            moa_search(model, **bad)
    with pytest.raises(InvalidArgumentError) as e:
        moa_search(model, ids, loss="hessian")
    assert e.value.argument == "loss"
    with attnzoo.patch(model, "sliding_window", window=8), pytest.raises(attnzoo.UnsupportedError):
        moa_search(model, ids)  # the influence is the model's own attention's
