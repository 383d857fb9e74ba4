"""The HTML report of a tiny run: parses, holds every plot, and its numbers are the stored ones."""

from html.parser import HTMLParser

import pytest

from attnzoo.bench import report
from attnzoo.bench.runner import BenchOptions, run_bench
from attnzoo.bench.specs import parse_method_spec
from attnzoo.bench.store import Store

pytest.importorskip("matplotlib")


class _Collect(HTMLParser):
    """Figures (id -> img src), result rows (data-id -> data-value cells), text, and tag balance."""

    VOID = {"img", "meta", "br", "hr", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.figures, self.rows, self.text = [], {}, {}, []
        self._figure = self._row = None
        self._table = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "table":
            self._table = a.get("class")
        if tag == "figure":
            self._figure = a["id"]
        if tag == "img" and self._figure:
            self.figures[self._figure] = a["src"]
        if tag == "tr" and "data-id" in a:
            self._row = (self._table, int(a["data-id"]))
            self.rows[self._row] = []
        if tag == "td" and self._row is not None:
            self.rows[self._row].append(a.get("data-value"))

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (self.stack[-3:], tag)
        self.stack.pop()
        if tag == "figure":
            self._figure = None
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        self.text.append(data)


def _parse(text):
    p = _Collect()
    p.feed(text)
    p.close()
    assert p.stack == []
    return p


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("bench") / "s.sqlite")
    opts = BenchOptions(methods=[parse_method_spec("sliding_window:window=16"), parse_method_spec("streaming")],
                        lengths=(64, 128), heads=2, dim=16, repeats=2, backward=True)
    run_id = run_bench(opts, store, progress=False).run_id
    yield store, run_id
    store.close()


# columns of the results table that hold stored fields, in order (see report._results_table)
RESULT_COLUMNS = {3: "length", 5: "median_ms", 6: "min_ms", 7: "setup_ms", 8: "repeats", 10: "density", 12: "tflops",
                  13: "peak_bytes"}


def test_report_parses_and_has_every_plot(tiny_run, tmp_path):
    store, run_id = tiny_run
    path = report.write_report(store, run_id, tmp_path / "r.html")
    page = _parse(path.read_text())
    expected = {f"plot-{kind}-local-{p}" for kind in ("time", "memory") for p in ("forward", "forward-backward")}
    assert set(page.figures) == expected
    assert all(src.startswith("data:image/png;base64,iVBOR") for src in page.figures.values())
    saved = report.save_plots(path.read_text(), tmp_path / "plots")
    assert sorted(p.stem for p in saved) == sorted(expected) and all(p.read_bytes()[:4] == b"\x89PNG" for p in saved)
    assert report.QUALITY_HINT in "".join(page.text)


def test_report_numbers_equal_the_store(tiny_run, tmp_path):
    store, run_id = tiny_run
    page = _parse(report.render(store.export(run_id)))
    stored = store.results(run_id)
    rows = {i: cells for (table, i), cells in page.rows.items() if table == "results"}
    assert sorted(rows) == sorted(r["id"] for r in stored)
    for r in stored:
        assert r["status"] == "ok"
        for col, field in RESULT_COLUMNS.items():
            assert rows[r["id"]][col] == repr(r[field]), (field, r[field])


def test_report_with_quality_has_pareto_and_heatmaps(tiny_run, tmp_path):
    store, run_id = tiny_run
    for spec, err in (("sliding_window:window=16", 0.2), ("streaming", 0.1), ("dense", 0.0)):
        store.add_quality(run_id, method=spec.split(":")[0], spec=spec, config={}, model="tiny", metric="rel_error",
                          value=err, status="ok", message=None, detail=None)
    store.add_heatmap(run_id, model="tiny", layer=0, head=0, label="exact", data=[[1.0, 0.0], [0.5, 0.5]])
    page = _parse(report.render(store.export(run_id)))
    assert {"plot-pareto", "plot-heatmap-tiny"} <= set(page.figures)
    quality = {i: cells for (table, i), cells in page.rows.items() if table == "quality"}
    assert sorted(float(c[3]) for c in quality.values()) == [0.0, 0.1, 0.2]


def test_report_without_matplotlib_keeps_tables(tiny_run, monkeypatch):
    store, run_id = tiny_run
    monkeypatch.setattr(report, "_matplotlib", lambda: None)
    page = _parse(report.render(store.export(run_id)))
    assert page.figures == {} and report.PLOTS_HINT in "".join(page.text)
    assert len([k for k in page.rows if k[0] == "results"]) == len(store.results(run_id))
