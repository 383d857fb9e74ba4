"""ACT (attention calibration of hidden sinks): the method against a literal loop reference written
from the paper and its code, a planted sink, mutants, the calibration search and patch on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from fidelity.mutation import Mutant, assert_caught
from helpers import qkv

import attnzoo
from attnzoo import InvalidArgumentError, UnknownNameError, UnsupportedError
from attnzoo.methods.exact import act as act_module


def loop_reference(q, k, v, *, causal: bool, scale: float, threshold: float, beta: float) -> torch.Tensor:
    """ACT written out in Python floats: softmax rows; a key j > 0 is a sink when the attention it
    receives, summed over the queries that see it and divided by their number, exceeds
    ``threshold``; sinks keep ``beta`` of their attention and each row's removed mass goes to the
    row's other keys in proportion to their attention."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    qd, kd, vd = q.double().tolist(), k.double().tolist(), v.double().tolist()
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            visible = [[not causal or j <= i + Nk - Nq for j in range(Nk)] for i in range(Nq)]
            rows = []
            for i in range(Nq):
                logits = [scale * sum(qd[b][h][i][d] * kd[b][g][j][d] for d in range(D)) if visible[i][j] else -math.inf
                          for j in range(Nk)]
                top = max(logits)
                exps = [math.exp(x - top) if x > -math.inf else 0.0 for x in logits]
                rows.append([e / sum(exps) for e in exps])
            sink = []
            for j in range(Nk):
                seen = [i for i in range(Nq) if visible[i][j]]
                received = sum(rows[i][j] for i in seen) / max(len(seen), 1)
                sink.append(j > 0 and received > threshold)
            for i in range(Nq):
                removed = (1 - beta) * sum(rows[i][j] for j in range(Nk) if sink[j])
                other = sum(rows[i][j] for j in range(Nk) if not sink[j])
                weights = [beta * rows[i][j] if sink[j] else rows[i][j] + removed * rows[i][j] / other for j in range(Nk)]
                for j in range(Nk):
                    out[b, h, i] += weights[j] * torch.tensor(vd[b][g][j], dtype=torch.float64)
    return out


def _close(a, b, tol=2e-5):
    assert (a.double() - b.double()).abs().max() <= tol * (1 + b.abs().max())


CASES = [  # (causal, Nq, Nk, threshold)
    (True, 12, 12, 0.1), (False, 10, 10, 0.12), (True, 3, 13, 0.1), (True, 1, 9, 0.15)]


def planted(rng, causal=True, n=12):
    """q, k, v (1, 4, n, 16) whose heads 1 and 3 send most attention to key 5 (and some to key 0)."""
    q, k, v = qkv(rng, B=1, Hq=4, Hkv=4, Nq=n, D=16)
    direction = torch.randn(16, generator=rng)
    for h in (1, 3):
        q[0, h] = 0.3 * q[0, h] + direction
        k[0, h, 5] = 2.0 * direction
        k[0, h, 0] = 1.2 * direction
    return q, k, v


def check_matches_loop(rng):
    for causal, nq, nk, threshold in CASES:
        q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=nq, Nk=nk, D=8)
        q[:, :, :, 0] += 3.0  # one shared direction: some keys collect attention (sinks to find)
        k[:, :, 2, 0] += 2.0
        method = attnzoo.get_method("act", threshold=threshold, beta=0.4)
        expected = loop_reference(q, k, v, causal=causal, scale=8 ** -0.5, threshold=threshold, beta=0.4)
        _close(method(q, k, v, causal=causal), expected)
        _close(method.reference(q, k, v, causal=causal), expected)
    q, k, v = planted(rng)
    _close(attnzoo.attention(q, k, v, "act", causal=True), loop_reference(q, k, v, causal=True, scale=0.25, threshold=0.1, beta=0.4))


def test_matches_the_loop_reference(rng):
    check_matches_loop(rng)


def _wrong_sinks_keep_first(probs, *, causal, threshold):
    return attnzoo.analysis.sinks(probs, causal=causal, threshold=threshold).is_sink


def _wrong_even_redistribution(probs, is_sink, beta):
    sink = is_sink[..., None, :]
    removed = (probs * sink).sum(-1, keepdim=True) * (1 - beta)
    allowed = (probs > 0) & ~sink
    return torch.where(sink, probs * beta, probs + removed * allowed / allowed.sum(-1, keepdim=True).clamp_min(1))


MUTANTS = [Mutant("first-token-calibrated", act_module, "sink_columns", _wrong_sinks_keep_first),
           Mutant("even-redistribution", act_module, "calibrate", _wrong_even_redistribution)]


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_is_caught(mutant, monkeypatch, rng):
    assert_caught(monkeypatch, mutant, lambda: check_matches_loop(rng))


@pytest.mark.parametrize("causal", [True, False])
def test_planted_sink_is_reduced_and_the_first_token_is_not(rng, causal):
    """With v the identity the output rows are the attention rows: the planted sink (key 5) of
    heads 1 and 3 keeps beta of its attention, key 0 and the other keys gain, rows still sum to 1;
    heads 0 and 2 (q = 0: attention spread evenly) have no sink beyond the first and stay exact."""
    n = 12
    q, k, _ = planted(rng, causal, n)
    q[0, (0, 2)] = 0.0
    eye = torch.eye(n)[None, None].expand(1, 4, n, n).contiguous()
    exact = attnzoo.attention(q, k, eye, "dense", causal=causal)
    calibrated = attnzoo.attention(q, k, eye, "act", causal=causal, beta=0.4)
    rows = slice(5, n) if causal else slice(0, n)
    for h in (1, 3):
        assert exact[0, h, rows, 5].min() > 0.3  # the plant worked: key 5 is a sink
        torch.testing.assert_close(calibrated[0, h, rows, 5], 0.4 * exact[0, h, rows, 5])
        assert bool((calibrated[0, h, rows, 0] > exact[0, h, rows, 0]).all())
    torch.testing.assert_close(calibrated.sum(-1), torch.ones(1, 4, n))
    if not causal:
        torch.testing.assert_close(calibrated[0, (0, 2)], exact[0, (0, 2)])
    # beta = 1 keeps everything
    torch.testing.assert_close(attnzoo.attention(q, k, eye, "act", causal=causal, beta=1.0), exact)


def test_bad_options():
    with pytest.raises(InvalidArgumentError, match="threshold"):
        attnzoo.get_method("act", threshold=1.5)
    with pytest.raises(InvalidArgumentError, match="beta"):
        attnzoo.get_method("act", beta=-0.1)
    with pytest.raises(UnknownNameError):
        attnzoo.get_method("act", scale_factor=0.4)


def test_select_at_a_gain_bar():
    pytest.importorskip("transformers")
    from attnzoo.integrations.transformers.act import act_select

    record = {"threshold": 0.1, "beta": 0.4, "baseline_nll": 50.0, "gains": {"0": [0.5, -1.0, 2.0], "3": [0.1, 0.0, -0.2]}}
    config = act_select({"act": record}, 0.3)
    assert config["format"] == "attnzoo-patterns/1" and config["act"]["min_gain"] == 0.3
    act = {"method": "act", "config": {"threshold": 0.1, "beta": 0.4}}
    assert config["layers"] == {"0": [act, {"method": "dense"}, act]}
    assert set(act_select({"act": record}, 0.0)["layers"]) == {"0", "3"}
    with pytest.raises(InvalidArgumentError, match="min_gain"):
        act_select({"act": record}, -1.0)


# ---- calibration search and patch on a tiny model ------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("transformers")
    from integrations.test_transformers import tiny_llama

    return tiny_llama()


@torch.no_grad()
def test_search_writes_a_config_patch_loads(llama, rng):
    from attnzoo.integrations.transformers.act import act_search
    from attnzoo.eval.perplexity import window_nll

    ids = torch.randint(0, 97, (1, 40), generator=rng)
    config = act_search(llama, ids, threshold=0.05, show_progress=False)
    gains = config["act"]["gains"]
    assert set(gains) == {"0", "1"} and all(len(g) == 4 for g in gains.values())
    chosen = {(int(layer), h) for layer, entries in config["layers"].items() for h, e in enumerate(entries) if e["method"] == "act"}
    assert chosen == {(int(layer), h) for layer, g in gains.items() for h, gain in enumerate(g) if gain > 0}
    # the recorded gain of one head is what calibrating that head alone does
    layer, head = 1, max(range(4), key=lambda h: abs(gains["1"][h]))
    single = {"format": "attnzoo-patterns/1",
              "layers": {"1": [{"method": "act", "config": {"threshold": 0.05, "beta": 0.4}} if h == head else {"method": "dense"}
                               for h in range(4)]}}
    with attnzoo.patch(llama, "act", config=single):
        assert config["act"]["baseline_nll"] - window_nll(llama, ids) == pytest.approx(gains["1"][head], abs=1e-4)
    assert gains["1"][head] != 0.0  # calibration changed something on this head
    with attnzoo.patch(llama, "act", config=config) as patched:
        patched(ids)  # prefill and a cached decode step run through the config
        out = patched.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 43)


def test_patch_config_errors(llama):
    with pytest.raises(UnsupportedError, match="names only 'act' and 'dense'"):
        attnzoo.patch(llama, "act", config={"format": "attnzoo-patterns/1", "layers": {"0": [{"method": "sliding_window",
                                                                                                 "config": {"window": 4}}] * 4}})
    with pytest.raises(InvalidArgumentError, match="config"):
        attnzoo.patch(llama, "act", config={"format": "attnzoo-patterns/1", "layers": {}}, layers=[0])
    with pytest.raises(InvalidArgumentError, match="layers"):
        attnzoo.patch(llama, "act", config={"format": "attnzoo-patterns/1", "layers": {"5": [{"method": "dense"}] * 4}})
