"""MInference's per-head pattern search: candidate scoring on synthetic inputs, and the whole search
on SmolLM2-135M (slow) with the written file loaded back by attnzoo.patch(model, "auto")."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import qkv

import attnzoo
from attnzoo.search import FORMAT, candidates, head_scores


def test_candidates_cover_the_three_patterns_at_the_budget():
    specs = candidates(0.1, 4096, block_size=64)
    assert {s["method"] for s in specs} == {"streaming", "vertical_slash", "block_sparse"}
    assert any(s["config"].get("vertical_columns") for s in specs)  # MInference's single-token vertical lines
    for s in specs:
        attnzoo.get_method(s["method"], **s["config"])  # every spec is a valid configuration


def test_head_scores_recall_and_density(rng):
    q, k, v = qkv(rng, B=1, Hq=4, Hkv=2, Nq=128, D=16)
    specs = [
        {"method": "block_sparse", "config": {"top_k": 8, "block_size": 16}},  # every block: exact
        {"method": "streaming", "config": {"sinks": 2, "window": 8}},
        {"method": "hip", "config": {"top_k": 2, "block_size": 16}},
    ]
    (full_r, full_d), (local_r, local_d), (hip_r, hip_d) = head_scores(q, k, v, True, 0.25, specs, chunk=48)
    assert torch.allclose(full_r, torch.ones(4, dtype=torch.float64)) and torch.allclose(full_d, torch.ones(4, dtype=torch.float64))
    assert torch.all(local_r < 1) and torch.all(local_r > 0) and torch.all(local_d < 0.2)
    assert torch.all(hip_r <= 1 + 1e-9) and torch.all(hip_d < 1)
    # recall is the exact attention mass on the support, computed here plainly
    probs = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.25).masked_fill(~torch.ones(128, 128, dtype=torch.bool).tril(), float("-inf")), -1)
    support = attnzoo.get_method("streaming", sinks=2, window=8).support(q, k, v, causal=True, scale=0.25)
    assert torch.allclose(local_r, (probs * support).sum(-1).mean(-1)[0].double(), atol=1e-5)


@pytest.mark.slow
def test_search_on_smollm2_writes_a_file_that_patch_loads(tmp_path):
    if not attnzoo.models.available()["smollm2-135m"]:
        pytest.skip("SmolLM2-135M files not installed")
    model, tokenizer = attnzoo.models.load("smollm2-135m", cache=True)
    path = tmp_path / "patterns.json"
    result = attnzoo.search_patterns(model, tokenizer, budget=0.5, max_tokens=256, path=path, show_progress=False)
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["format"] == FORMAT and data["budget"] == 0.5
    heads = model.config.num_attention_heads
    assert len(data["layers"]) == model.config.num_hidden_layers
    chosen = set()
    for entries in data["layers"].values():
        assert len(entries) == heads
        for e in entries:
            chosen.add(e["method"])
            assert 0 < e["recall"] <= 1 and 0 < e["density"] <= 1
    assert chosen <= {"streaming", "vertical_slash", "block_sparse"}
    ids = attnzoo.eval.token_ids(tokenizer, attnzoo.eval.english_text())[:256][None]
    with torch.no_grad():
        dense = model(ids).logits
        with attnzoo.patch(model, "auto", config=str(path)):
            patched = model(ids).logits
    assert not torch.equal(dense, patched)  # the patterns ran
    agree = (dense.argmax(-1) == patched.argmax(-1)).float().mean()
    assert agree > 0.8
