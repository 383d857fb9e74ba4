"""The commands: bench -> report -> compare through ``attnzoo.cli.main``; Ctrl-C mid-run."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from attnzoo.cli import main

SRC = str(Path(__file__).resolve().parents[2] / "src")
TINY = ["--lengths", "64,128", "--heads", "2", "--dim", "16", "--repeats", "2", "--no-progress",
        "--method", "sliding_window:window=16"]


def test_bench_report_compare(tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["bench", *TINY, "--out", str(out)]) == 0
    assert main(["bench", *TINY, "--out", str(out), "--causal"]) == 0
    text = capsys.readouterr().out
    assert f"report: {(out / 'report.html').resolve()}" in text and "efficiency length" in text
    assert (out / "results.json").exists()
    store = str(out / "attnzoo.sqlite")
    assert main(["report", "--store", store, "--list"]) == 0
    run_a, run_b = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert main(["report", "--store", store, "--run", run_a[:-2], "--out", str(tmp_path / "a.html")]) == 0
    assert (tmp_path / "a.html").read_text().startswith("<!DOCTYPE html>")
    assert main(["compare", run_a, run_b, "--store", store]) == 0
    table = capsys.readouterr().out
    # run A was non-causal, run B causal: nothing in common, each row listed with one side missing
    assert "skipped -> None" not in table and "ok -> None" in table and "None -> ok" in table
    assert main(["compare", run_a, run_a, "--store", store]) == 0
    same = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sliding_window")]
    assert len(same) == 2 and all(" 1.00 " in line for line in same)
    assert main(["report", "--store", store, "--run", "missing"]) == 2


def test_bad_arguments_give_clear_errors(tmp_path, capsys):
    assert main(["bench", "--method", "sliding_windw", "--out", str(tmp_path)]) == 2
    assert "did you mean 'sliding_window'" in capsys.readouterr().err
    assert main(["bench", "--heads", "8", "--kv-heads", "3", "--out", str(tmp_path)]) == 2
    assert "heads_kv" in capsys.readouterr().err


def test_sigint_mid_run_leaves_a_consistent_store(tmp_path):
    store = tmp_path / "s.sqlite"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # many slow measurements: each takes about a second of repeats, so the signal lands mid-run
    cmd = [sys.executable, "-m", "attnzoo.cli", "bench", "--lengths", "64,128,256,512", "--heads", "2", "--dim", "16",
           "--repeats", "100000", "--max-seconds", "0.5", "--no-progress", "--out", str(tmp_path), "--store", str(store),
           "--method", "sliding_window:window=16", "--method", "streaming"]
    # a shell that starts jobs in the background makes them ignore SIGINT; give the child the default handler
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        rows = 0
        while rows < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if store.exists():
                try:
                    with sqlite3.connect(store, timeout=5) as conn:
                        rows = conn.execute("SELECT count(*) FROM results").fetchone()[0]
                except sqlite3.OperationalError:  # tables not created yet
                    pass
        assert rows >= 2, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err
    with sqlite3.connect(store) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        status = conn.execute("SELECT status FROM runs").fetchall()
        assert status == [("interrupted",)]
        results = conn.execute("SELECT status, median_ms FROM results").fetchall()
    assert 2 <= len(results) < 12  # 4 lengths x 3 methods when complete
    assert all(s == "ok" and ms > 0 for s, ms in results)
    assert (tmp_path / "report.html").exists()  # the report of what was measured
