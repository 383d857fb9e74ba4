"""The SQLite results store: round trip, accumulation across runs, run lookup, JSON export."""

import json

import pytest

from attnzoo.bench.store import Store


def _row(**over):
    row = dict(method="sliding_window", spec="sliding_window:window=16", family="local", config={"window": 16},
               causal=True, pass_="forward", batch=1, heads_q=2, heads_kv=1, length=128, dim=16, dtype="float32",
               device="cpu", status="ok", message=None, backend="gather", setup_ms=3.25, median_ms=1.5, min_ms=1.25,
               times_ms=[1.5, 1.25, 1.75], repeats=3, peak_bytes=123456, density=0.125, flops=1e6, tflops=6.6e-4)
    row.update(over)
    row["pass"] = row.pop("pass_")
    return row


def test_round_trip(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        run = store.start_run({"lengths": [128]}, {"cpu": "test cpu", "threads": 2})
        written = [_row(), _row(status="error", message="RuntimeError: boom", median_ms=None, times_ms=None)]
        ids = [store.add_result(run, **r) for r in written]
        store.add_quality(run, method="sliding_window", spec="sliding_window:window=16", config={"window": 16},
                          model="m", metric="rel_error", value=0.25, status="ok", message=None, detail={"layers": [0, 1]})
        store.add_heatmap(run, model="m", layer=0, head=1, label="exact", data=[[0.5, 0.5], [0.0, 1.0]])
        store.finish_run(run, "complete")
    with Store(path) as store:  # reopened: everything was committed
        got = store.results(run)
        assert [g["id"] for g in got] == ids
        for g, w in zip(got, written):
            for key, value in w.items():
                assert g[key] == (int(value) if isinstance(value, bool) else value), key
        assert store.run(run)["status"] == "complete" and store.run(run)["machine"]["cpu"] == "test cpu"
        assert store.quality(run)[0]["detail"] == {"layers": [0, 1]}
        assert store.heatmaps(run)[0]["data"] == [[0.5, 0.5], [0.0, 1.0]]
        exported = json.loads(store.export_json(run, tmp_path / "run.json").read_text())
        assert exported["results"][0]["median_ms"] == 1.5 and exported["run"]["id"] == run


def test_runs_accumulate_and_lookup(tmp_path):
    with Store(tmp_path / "s.sqlite") as store:
        a = store.start_run({}, {})
        b = store.start_run({}, {})
        store.add_result(b, **_row())
        assert [r["id"] for r in store.runs()] == [a, b]
        assert store.run()["id"] == b  # latest
        assert store.run(a)["status"] == "running"
        assert store.results(a) == [] and len(store.results(b)) == 1
        with pytest.raises(LookupError, match="matches 0 runs"):
            store.run("nope")
        with pytest.raises(KeyError, match="unknown results fields"):
            store.add_result(a, **_row(), bogus=1)
