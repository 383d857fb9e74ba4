"""attnzoo bench --world-size: the scaling model's fit, and one small CLI run on 2 processes whose
counted bytes equal the plans the model prices."""

from __future__ import annotations

import json

import numpy as np
import torch

from attnzoo.cli import main
from attnzoo.distributed.bench import FEATURES, fit, predict


def test_fit_recovers_known_constants(rng):
    """Runs timed exactly by known constants: the non-negative least squares gives them back."""
    truth = dict(zip(FEATURES, (2e-4, 3e-9, 1e-8, 0.0)))  # no halo runs: its gamma stays 0
    rows = []
    for world in (2, 4):
        for length in (1024, 4096, 16384):
            jitter = 1 + float(torch.rand((), generator=rng)) * 0.2  # bytes not proportional to pairs
            volume = {"messages": 2 * (world - 1), "bytes": int(length * 256 * jitter) * (world - 1) // world,
                      "pairs": length * length // world}
            rows.append({"world": world, "strategy": "ring", "planned": volume, "seconds": predict(truth, volume, "ring")})
    model = fit(rows)
    for name in FEATURES:
        assert np.isclose(model[name], truth[name], rtol=1e-6, atol=1e-15), (name, model[name], truth[name])


def test_world_size_cli_counts_bytes_and_predicts(tmp_path, capsys):
    code = main(["bench", "--world-size", "2", "--lengths", "256", "--method", "dense", "--method", "sliding_window:window=16",
                 "--heads", "2", "--dim", "8", "--repeats", "1", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "distributed.json").read_text())
    runs = {(r["method"], r["world"]): r for r in result["runs"]}
    assert runs[("dense", 2)]["bytes_sent"] == 128 * 2 * 2 * 8 * 4  # the other rank's K and V, float32
    assert runs[("sliding_window:window=16", 2)]["bytes_sent"] == 8 * 2 * 2 * 8 * 4  # worst rank: window 16 reaches 8 keys right (7 left)
    assert result["bytes_counted_vs_planned_max_rel"] == 0
    assert {(p["method"], p["world"]) for p in result["predictions"]} == {
        (m, w) for m in ("dense", "sliding_window:window=16") for w in (8, 64)}
    assert "MODEL prediction" in capsys.readouterr().out
