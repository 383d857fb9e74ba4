"""attnzoo.bench.report.cache_streaming_report: the page of a long generation under a fixed KV budget."""

from __future__ import annotations

import pytest

from attnzoo.bench.report import FIGURE, cache_streaming_report


def samples(n: int) -> list[dict]:
    return [{"step": 100 * (i + 1), "cache_bytes": 1000 * min(i + 1, 3), "rss_mb": 900.0 + i, "decode_ms": 20.0 + i} for i in range(n)]


def test_the_page_has_every_sample_and_the_runs_facts():
    page = cache_streaming_report(samples(5), {"command": "python benchmarks/cache_streaming.py --steps 500", "load": 3.5})
    for sample in samples(5):
        assert f"<td class='l'>{sample['step']}</td><td>{sample['cache_bytes']}</td><td>{sample['rss_mb']:.1f}</td>" in page
    assert "--steps 500" in page and "3.5" in page


def test_the_plot_is_drawn_with_matplotlib():
    pytest.importorskip("matplotlib")
    page = cache_streaming_report(samples(4), {})
    assert [plot_id for plot_id, _ in FIGURE.findall(page)] == ["plot-cache-streaming"]
    assert FIGURE.findall(cache_streaming_report([], {})) == []  # nothing to draw yet
