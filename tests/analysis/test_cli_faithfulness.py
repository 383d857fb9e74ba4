"""Every analysis tool through ``attnzoo analyze``'s driver on a tiny patched model, the CLI's
argument errors, and the deletion curves of analysis.faithfulness."""

from __future__ import annotations

import json

import pytest
import torch
from analysis.tiny_models import VOCAB, tiny

import attnzoo
from attnzoo import InvalidArgumentError
from attnzoo.analysis.cli import TOOLS, analyze
from attnzoo.analysis.faithfulness import deletion_area, deletion_curve, deletion_order
from attnzoo.cli import main

pytest.importorskip("transformers")


class WordTokenizer:
    """Splits on spaces; ids are a hash of the word (offline stand-in for a real tokenizer)."""

    all_special_tokens = ("<s>",)

    def __call__(self, text, return_tensors="pt"):
        words = ["<s>", *text.split()]
        self.vocab = {**getattr(self, "vocab", {}), **{3 + sum(map(ord, w)) % (VOCAB - 3): w for w in words}}
        return {"input_ids": torch.tensor([[3 + sum(map(ord, w)) % (VOCAB - 3) for w in words]])}

    def convert_ids_to_tokens(self, ids):
        return [self.vocab.get(i, f"<{i}>") for i in ids]

    def decode(self, ids):
        return " ".join(self.convert_ids_to_tokens(ids))


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_runs_on_a_patched_model(tool, tmp_path):
    model = tiny("llama")
    attnzoo.patch(model, attnzoo.get_method("sliding_window", window=4))
    try:
        summary = analyze(model, WordTokenizer(), "one two three four five six seven", tool, tmp_path, show_progress=False,
                          pictures=False)
    finally:
        attnzoo.unpatch(model)
    json.dumps(summary)  # the summary is JSON
    written = {p.name for p in tmp_path.iterdir()}
    assert written, tool
    if "tokens" in summary and isinstance(summary["tokens"][0], dict):
        assert len(summary["tokens"]) == 8 and f"{tool}.html" in written
    if tool == "sinks":
        assert len(summary["layers"]) == 2 and "attention.html" in written


def test_cli_refuses_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "--text", "x.txt", "--tool", "nope"])
    assert main(["analyze", "--text", str(tmp_path / "missing.txt"), "--tool", "sinks", "--out", str(tmp_path)]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_deletion_curves_follow_the_logit(rng):
    model = tiny("llama")
    ids = torch.randint(3, VOCAB, (1, 10), generator=rng)
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1]
    target = int(full.argmax())
    order = deletion_order(torch.arange(10.0), keep=[0])
    assert order == [9, 8, 7, 6, 5, 4, 3, 2, 1]
    curve = deletion_curve(model, ids, order, target=target, replacement=0, steps=3)
    assert len(curve) == 4 and curve[0] == pytest.approx(float(full[target]), abs=1e-5)
    emptied = ids.clone()
    emptied[0, 1:] = 0
    with torch.no_grad():
        assert curve[-1] == pytest.approx(float(model(input_ids=emptied).logits[0, -1, target]), abs=1e-5)
    assert deletion_area([1.0, 0.0]) == 0.5 and deletion_area([2.0, 2.0, 2.0]) == 2.0
    removed = deletion_curve(model, ids, order, target=target, steps=3, value="log_prob")
    with torch.no_grad():
        assert removed[-1] == pytest.approx(float(model(input_ids=ids[:, :1]).logits[0, -1].log_softmax(-1)[target]), abs=1e-5)
    with pytest.raises(InvalidArgumentError, match="input_ids"):
        deletion_curve(model, ids[0], order, target=target, replacement=0)
    with pytest.raises(InvalidArgumentError, match="position"):
        deletion_curve(model, ids, order, target=target, position=3)
