"""``attnzoo distill`` on the command line: a short run on vit-digits, resuming, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

import attnzoo
from attnzoo.cli import main

pytest.importorskip("safetensors")
pytest.importorskip("sklearn")


def test_a_short_run_resumes_and_loads(tmp_path, capsys):
    out, data = tmp_path / "run", tmp_path / "images.pt"
    torch.save(torch.rand(5, 1, 32, 32), data)  # 4 to train on, 1 held out
    args = ["distill", "--model", "vit-digits", "--method", "seer", "--data", str(data), "--val-fraction", "0.2", "--out", str(out), "--layers", "0",
            "--set", "block_size=32", "--set", "top_k=2", "--no-progress"]
    assert main([*args, "--steps", "2"]) == 0
    assert main([*args, "--steps", "3"]) == 0  # resumes from step 2
    assert "step 3/3" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and "val_gate_kl" in lines[-1]
    model, prepare = attnzoo.models.load("vit-digits")
    with attnzoo.patch(model, "seer", weights=out):
        assert model(torch.rand(1, 1, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("extra, message", [
    (["--data", "missing.txt", "--steps", "1"], "--data: expected an existing UTF-8 text file"),
    (["--data", "digits", "--steps", "0"], "--steps: expected an integer >= 1"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, extra, message):
    model = "smollm2-135m" if "missing.txt" in extra else "vit-digits"
    assert main(["distill", "--model", model, "--method", "seer", "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_empty_text_file_is_refused_before_the_model_loads(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["distill", "--model", "smollm2-135m", "--method", "seer", "--data", str(empty), "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    assert "data: expected a non-empty text" in capsys.readouterr().err
