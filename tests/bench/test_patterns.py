"""CAB's four patterns as a sweep axis: the shapes each one runs, declared support recorded as
skipped, the compatibility matrix, and stores written before the axis existed."""

import sqlite3

import pytest

from attnzoo.bench import analysis, report
from attnzoo.bench.patterns import CROSS_QUERY_DIVISOR, PATTERNS, parse_patterns, support_matrix
from attnzoo.bench.runner import BenchOptions, run_bench
from attnzoo.bench.specs import parse_method_spec
from attnzoo.bench.store import Store
from attnzoo.cli import main
from attnzoo.errors import InvalidArgumentError
from attnzoo.registry import method_class

ALL = tuple(p.name for p in PATTERNS)


@pytest.fixture(scope="module")
def pattern_run(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("patterns") / "s.sqlite")
    opts = BenchOptions(methods=[parse_method_spec(t) for t in ("sliding_window:window=16", "hilo", "streaming")],
                        lengths=(64, 256), heads=2, dim=16, repeats=2, patterns=ALL, memory=False)
    run_id = run_bench(opts, store, progress=False).run_id
    yield store.results(run_id), store.export(run_id)
    store.close()


def test_every_pattern_runs_its_shape(pattern_run):
    rows, _ = pattern_run
    by = {(r["method"], r["length"], r["pattern"]): r for r in rows}
    assert len(rows) == 4 * 4 * 2  # dense + 3 methods, 4 patterns, 2 lengths
    for n in (64, 256):
        for p in PATTERNS:
            r = by[("sliding_window", n, p.name)]
            assert r["status"] == "ok", r["message"]
            assert r["causal"] == p.causal and r["length"] == n
            assert r["length_q"] == (n // CROSS_QUERY_DIVISOR if p.cross else n)
            assert by[("dense", n, p.name)]["status"] == "ok"
        cross = by[("dense", n, "noncausal-cross")]
        assert cross["flops"] == pytest.approx(4 * 2 * (n // CROSS_QUERY_DIVISOR) * n * 16)


def test_undeclared_patterns_are_skipped_with_the_reason(pattern_run):
    rows, _ = pattern_run
    by = {(r["method"], r["length"], r["pattern"]): r for r in rows}
    assert by[("hilo", 64, "noncausal-self")]["status"] == "ok"
    for pattern, reason in (("causal-self", "non-causal only"), ("noncausal-cross", "self-attention only"),
                            ("causal-cross", "non-causal only")):
        assert by[("hilo", 64, pattern)]["status"] == "skipped" and reason in by[("hilo", 64, pattern)]["message"]
    assert "causal only" in by[("streaming", 64, "noncausal-cross")]["message"]
    assert by[("streaming", 256, "causal-cross")]["status"] == "ok"


def test_compatibility_matrix_follows_declared_support_and_measurements(pattern_run):
    rows, export = pattern_run
    matrix = {r["spec"]: r["cells"] for r in analysis.compatibility(rows, report.declared_support(rows))}
    assert set(matrix) == {"dense", "sliding_window:window=16", "hilo", "streaming"}
    for spec, method in (("hilo", "hilo"), ("streaming", "streaming")):
        declared = support_matrix(method_class(method).info)
        assert {p: c["declared"] for p, c in matrix[spec].items()} == declared
        assert {p: c["measured"] for p, c in matrix[spec].items()} == declared  # all that is declared ran
    assert report.matrix_cell(matrix["hilo"]["causal-cross"], "hilo") == "no"
    assert report.matrix_cell(matrix["dense"]["causal-cross"], "dense") == "yes (the baseline)"
    # the efficiency length in a cell is the one of that pattern's summary row
    summary = {(s["spec"], s["pattern"]): s for s in analysis.summary(rows)}
    for p in ALL:
        cell, s = matrix["sliding_window:window=16"][p], summary[("sliding_window:window=16", p)]
        assert (cell["efficiency_length"], cell["speedup"]) == (s["efficiency_length"], s["speedup"])
        text = report.matrix_cell(cell, "sliding_window")
        assert text.startswith(f"yes, faster from N={s['efficiency_length']}" if s["efficiency_length"] else "yes, never")
    table = report.render(export).split('<table class="compatibility">')[1].split("</table>")[0]
    assert table.count("<tr>") == 5 and table.count('<td class="l">no</td>') == 5  # header + 4 methods; hilo 3, streaming 2


def test_matrix_cells_without_measurements():
    cell = {"declared": True, "measured": False, "efficiency_length": None, "speedup": None, "at_length": None,
            "failure": None}
    assert report.matrix_cell(cell, "hip") == "yes (not run)"
    assert report.matrix_cell({**cell, "failure": "error: RuntimeError: boom"}, "hip") == "did not run: error: RuntimeError: boom"
    measured = {**cell, "measured": True, "speedup": 0.5, "at_length": 4096}
    assert report.matrix_cell(measured, "hip") == "yes, never faster (0.50x at N=4096)"
    assert report.matrix_cell({**measured, "efficiency_length": 1024, "speedup": 3.0}, "hip") == "yes, faster from N=1024"


def test_parse_patterns_and_options():
    assert parse_patterns("all") == ALL
    assert parse_patterns("causal-cross, noncausal-self") == ("noncausal-self", "causal-cross")
    with pytest.raises(InvalidArgumentError, match="pattern"):
        parse_patterns("causal-selff")
    with pytest.raises(InvalidArgumentError, match="patterns"):
        BenchOptions(patterns=("causal-self",), mode="both")
    assert [p.name for p in BenchOptions(mode="both").patterns_of(parse_method_spec("sliding_window"))] == [
        "noncausal-self", "causal-self"]


def test_cli_pattern_argument(tmp_path, capsys):
    tiny = ["--lengths", "64", "--heads", "2", "--dim", "16", "--repeats", "1", "--no-progress", "--no-memory",
            "--method", "streaming", "--out", str(tmp_path)]
    assert main(["bench", *tiny, "--pattern", "causal-self,causal-cross"]) == 0
    out = capsys.readouterr().out
    assert "compatibility" in out and "causal-cross" in out
    with pytest.raises(SystemExit):
        main(["bench", *tiny, "--pattern", "diagonal"])
    assert "--pattern" in capsys.readouterr().err
    assert main(["bench", *tiny, "--pattern", "all", "--causal"]) == 2
    assert "mode left at 'auto'" in capsys.readouterr().err


def test_stores_from_before_the_pattern_axis_open_with_patterns_filled_in(tmp_path):
    path = tmp_path / "old.sqlite"
    with Store(path) as store:
        run = store.start_run({}, {})
    with sqlite3.connect(path) as conn:  # the results table as the first stores had it
        conn.execute("DROP TABLE results")
        conn.execute("CREATE TABLE results (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, created REAL, method TEXT, "
                     "spec TEXT, family TEXT, config TEXT, causal INTEGER, pass TEXT, batch INTEGER, heads_q INTEGER, "
                     "heads_kv INTEGER, length INTEGER, dim INTEGER, dtype TEXT, device TEXT, status TEXT, message TEXT, "
                     "backend TEXT, setup_ms REAL, median_ms REAL, min_ms REAL, times_ms TEXT, repeats INTEGER, "
                     "peak_bytes INTEGER, density REAL, flops REAL, tflops REAL)")
        for causal in (0, 1):
            conn.execute("INSERT INTO results (run_id, created, method, spec, family, config, causal, pass, batch, heads_q, "
                         "heads_kv, length, dim, dtype, device, status) VALUES (?, 0, 'dense', 'dense', 'exact', '{}', ?, "
                         "'forward', 1, 2, 2, 128, 16, 'float32', 'cpu', 'ok')", (run, causal))
    with Store(path) as store:
        got = [(r["causal"], r["pattern"], r["length_q"]) for r in store.results(run)]
    assert got == [(0, "noncausal-self", 128), (1, "causal-self", 128)]
