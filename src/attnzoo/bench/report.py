"""One self-contained HTML report of a stored run: tables always, plots (base64 PNG) when matplotlib
is installed (``pip install attnzoo[report]``)."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..errors import UnknownNameError
from ..registry import method_class
from .analysis import compatibility, curves, summary, with_dense
from .measure import FLOP_MODEL, MEMORY_METHOD
from .patterns import BY_NAME, CROSS_QUERY_DIVISOR, support_matrix
from .store import Store

DENSE_STYLES = {"noncausal-self": "--", "causal-self": ":", "noncausal-cross": "-.", "causal-cross": (0, (1, 4))}
PLOTS_HINT = "Plots need matplotlib: pip install attnzoo[report]"
QUALITY_HINT = "No quality results in this run: run attnzoo bench --quality quick for approximation error, recall and the speed-versus-error chart."

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f2f2f2} td.l,th.l{text-align:left}
tr.error td,tr.oom td{background:#fde8e8} tr.skipped td{color:#888}
figure{display:inline-block;margin:0.5em} figcaption{font-size:13px;color:#555}
.note{color:#555;font-size:13px}
"""


def _esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e5 else f"{x:.3e}"
    return str(x)


def _num(x: Any, text: str | None = None) -> str:
    """A numeric cell carrying the exact stored value in ``data-value``."""
    value = "" if x is None else repr(x)
    return f'<td data-value="{value}">{_esc(text if text is not None else _fmt(x))}</td>'


def _mib(b: Any) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _table(headers: list[str], rows: list[str], cls: str = "") -> str:
    head = "".join(f'<th class="l">{_esc(h)}</th>' if i == 0 else f"<th>{_esc(h)}</th>" for i, h in enumerate(headers))
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _pattern(name: str) -> str:
    return BY_NAME[name].title if name in BY_NAME else str(name)


# ---- plots -----------------------------------------------------------------------------------
def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def _png(fig, plt) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figure(plot_id: str, caption: str, b64: str) -> str:
    return (f'<figure id="{plot_id}"><img alt="{_esc(caption)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _length_plots(results: list[dict[str, Any]], plt) -> list[str]:
    """Time and peak memory against length, one figure per family and pass; dense drawn in each."""
    out = []
    by_curve = curves([r for r in results if r["status"] == "ok"])
    families = sorted({r["family"].split("/")[0] for r in results if r["method"] != "dense"}) or ["exact"]
    passes = sorted({r["pass"] for r in results})
    for field, label, scale in (("median_ms", "time (ms, median)", 1.0), ("peak_bytes", "peak memory (MiB)", 2.0**-20)):
        for family in families:
            for pass_ in passes:
                fig, ax = plt.subplots(figsize=(7, 4))
                ax.set_prop_cycle(color=plt.cm.tab20.colors)
                drawn = 0
                for key, curve in sorted(by_curve.items(), key=lambda kv: str(kv[0])):
                    r0 = curve[0]
                    if r0["pass"] != pass_ or not (r0["method"] == "dense" or r0["family"].split("/")[0] == family):
                        continue
                    pts = [(r["length"], r[field] * scale) for r in curve if r.get(field) is not None]
                    if not pts:
                        continue
                    xs, ys = zip(*pts)
                    dense = {"color": "k", "linestyle": DENSE_STYLES.get(r0["pattern"], "-")} if r0["method"] == "dense" else {}
                    ax.plot(xs, ys, marker="o", ms=3, label=f"{r0['spec']} ({_pattern(r0['pattern'])})", **dense)
                    drawn += 1
                if not drawn:
                    plt.close(fig)
                    continue
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("sequence length N")
                ax.set_ylabel(label)
                ax.set_title(f"{family}: {label.split(' (')[0]} ({pass_})")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
                kind = "time" if field == "median_ms" else "memory"
                out.append(_figure(f"plot-{kind}-{family}-{pass_.replace('+', '-')}",
                                   f"{kind} against length, family {family}, {pass_}", _png(fig, plt)))
    return out


def _pareto_points(results, quality) -> list[dict[str, Any]]:
    """Per method spec: speed-up over dense at the longest length both ran (forward) and mean relative error."""
    speed = {}
    for s in summary(results):
        if s["pass"] == "forward" and s["speedup"] is not None:
            speed.setdefault(s["spec"], s)
    errors = defaultdict(list)
    for q in quality:
        if q["metric"] == "rel_error" and q["status"] == "ok" and q["value"] is not None:
            errors[q["spec"]].append(q["value"])
    return [{"spec": spec, "speedup": speed[spec]["speedup"], "at_length": speed[spec]["at_length"],
             "rel_error": sum(e) / len(e)} for spec, e in sorted(errors.items()) if spec in speed]


def _pareto_plot(points, plt) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in points:
        ax.scatter(p["speedup"], max(p["rel_error"], 1e-8))
        ax.annotate(p["spec"], (p["speedup"], max(p["rel_error"], 1e-8)), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("speed-up over dense (forward, longest common length)")
    ax.set_ylabel("relative error on real q/k/v (mean; 0 drawn at 1e-8)")
    ax.set_title("speed versus error (lower right is better)")
    ax.grid(True, which="both", alpha=0.3)
    return _figure("plot-pareto", "speed versus approximation error", _png(fig, plt))


def _heatmap_plots(heatmaps, plt) -> list[str]:
    out = []
    by_model = defaultdict(list)
    for h in heatmaps:
        by_model[h["model"]].append(h)
    for model, maps in sorted(by_model.items()):
        maps = maps[:16]
        cols = min(4, len(maps))
        rows = -(-len(maps) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, h in zip(axes.flat, maps):
            ax.imshow([[x ** 0.5 for x in row] for row in h["data"]], cmap="viridis", interpolation="nearest")
            ax.set_title(f"L{h['layer']} H{h['head']} {h['label']}", fontsize=7)
        fig.suptitle(f"{model}: exact attention per head (square-root colour scale)", fontsize=9)
        safe = "".join(c if c.isalnum() else "-" for c in model)
        out.append(_figure(f"plot-heatmap-{safe}", f"per-head attention patterns, {model}", _png(fig, plt)))
    return out


# ---- tables ----------------------------------------------------------------------------------
def _summary_table(results) -> str:
    rows = []
    for s in summary(results):
        rows.append(
            f'<tr><td class="l">{_esc(s["spec"])}</td><td class="l">{_esc(s["family"])}</td><td class="l">{_pattern(s["pattern"])}</td>'
            f'<td class="l">{_esc(s["pass"])}</td>'
            + _num(s["efficiency_length"], "never" if s["efficiency_length"] is None and s["speedup"] is not None else None)
            + _num(s["at_length"]) + _num(s["speedup"]) + _num(s["density"]) + _num(s["sparse_efficiency"])
            + _num(s["time_exponent"]) + _num(s["memory_exponent"]) + _num(s["max_peak_bytes"], _mib(s["max_peak_bytes"]))
            + f'<td class="l">{_esc(", ".join(f"{n}: {st}" for n, st in s["failed"]))}</td></tr>')
    return _table(["method", "family", "pattern", "pass", "efficiency length", "at N", "speed-up vs dense", "density",
                   "sparse efficiency", "time ~ N^x", "memory ~ N^x", "max peak MiB", "not ok"], rows, "summary")


def _results_table(results) -> str:
    rows = []
    for r in with_dense(results):
        rows.append(
            f'<tr class="{_esc(r["status"])}" data-id="{r["id"]}"><td class="l">{_esc(r["spec"])}</td><td class="l">{_pattern(r["pattern"])}</td>'
            f'<td class="l">{_esc(r["pass"])}</td>' + _num(r["length"]) + f'<td class="l">{_esc(r["status"])}</td>'
            + _num(r["median_ms"]) + _num(r["min_ms"]) + _num(r["setup_ms"]) + _num(r["repeats"])
            + _num(r["speedup"]) + _num(r["density"]) + _num(r["sparse_efficiency"]) + _num(r["tflops"])
            + _num(r["peak_bytes"], _mib(r["peak_bytes"]))
            + f'<td class="l">{_esc(r["backend"])}</td><td class="l">{_esc(json.dumps(r["config"]))}</td>'
            f'<td class="l">{_esc(r["message"])}</td></tr>')
    return _table(["method", "pattern", "pass", "N", "status", "median ms", "min ms", "setup ms", "repeats",
                   "speed-up vs dense", "density", "sparse efficiency", "TFLOP/s", "peak MiB", "backend", "config",
                   "message"], rows, "results")


def declared_support(results) -> dict[str, dict[str, bool]]:
    """Method name -> pattern name -> declared support, for the registered methods of ``results``."""
    out = {}
    for name in {r["method"] for r in results}:
        try:
            out[name] = support_matrix(method_class(name).info)
        except UnknownNameError:  # a stored run of a method this install does not have
            pass
    return out


def matrix_cell(cell: dict[str, Any], method: str) -> str:
    """The text of one compatibility cell: no / not run / the efficiency length / why it did not run."""
    if cell["declared"] is False:
        return "no"
    if cell["measured"]:
        if method == "dense":
            return "yes (the baseline)"
        if cell["efficiency_length"] is not None:
            return f"yes, faster from N={cell['efficiency_length']}"
        if cell["speedup"] is None:
            return "yes (dense not measured)"
        return f"yes, never faster ({cell['speedup']:.2f}x at N={cell['at_length']})"
    if cell["failure"] is not None:
        return f"did not run: {cell['failure'][:120]}"
    return "yes (not run)" if cell["declared"] else "? (not run)"


def _compatibility_table(results) -> str:
    rows = []
    for row in compatibility(results, declared_support(results)):
        cells = "".join(f'<td class="l">{_esc(matrix_cell(row["cells"][p], row["method"]))}</td>' for p in BY_NAME)
        rows.append(f'<tr><td class="l">{_esc(row["spec"])}</td>{cells}</tr>')
    return _table(["method"] + [p.title for p in BY_NAME.values()], rows, "compatibility")


def _quality_table(quality) -> str:
    rows = [f'<tr class="{_esc(q["status"])}" data-id="{q["id"]}"><td class="l">{_esc(q["spec"])}</td><td class="l">{_esc(q["model"])}</td>'
            f'<td class="l">{_esc(q["metric"])}</td>' + _num(q["value"], None if q["value"] is None else f'{q["value"]:.4g}')
            + f'<td class="l">{_esc(q["status"])}</td><td class="l">{_esc(q["message"])}</td></tr>' for q in quality]
    return _table(["method", "model", "metric", "value", "status", "message"], rows, "quality")


def _quality_pivot(quality) -> str:
    """One row per method, one column per (model, metric) with a value."""
    columns = sorted({(q["model"], q["metric"]) for q in quality if q["status"] == "ok"})
    values = defaultdict(dict)
    for q in quality:
        if q["status"] == "ok":
            values[q["spec"]][(q["model"], q["metric"])] = q["value"]
    rows = [f'<tr><td class="l">{_esc(spec)}</td>' + "".join(_num(v.get(c), None if v.get(c) is None else f"{v[c]:.4g}") for c in columns)
            + "</tr>" for spec, v in sorted(values.items())]
    return _table(["method"] + [f"{m} {metric}" for m, metric in columns], rows, "quality-pivot")


def render(export: dict[str, Any]) -> str:
    """HTML of one run's export (:meth:`Store.export`)."""
    run, results, quality, heatmaps = export["run"], export["results"], export["quality"], export["heatmaps"]
    plt = _matplotlib()
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>attnzoo bench {_esc(run['id'])}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>attnzoo bench: run {_esc(run['id'])}</h1>"]
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(run["started"]))
    info = [("status", run["status"]), ("started", started)] + [(k, v) for k, v in run["machine"].items()]
    info += [(f"option {k}", v) for k, v in run["options"].items()]
    parts.append(_table(["", ""], [f'<tr><td class="l">{_esc(k)}</td><td class="l">{_esc(v)}</td></tr>' for k, v in info], "run"))
    if run["status"] != "complete":
        parts.append(f"<p><b>This run is {_esc(run['status'])}: the tables hold what was measured before it stopped.</b></p>")
    device = (run["machine"].get("device") or "cpu").split(":")[0]
    parts.append(
        "<h2>How it was measured</h2><p class='note'>Times: median of repeated calls after a first (setup) call, "
        "timed separately; device synchronised around each call; dense SDPA measured in the same run. "
        f"Speed-up = dense time / method time. Sparse efficiency = dense time x density / method time (1.0 is ideal). "
        f"Efficiency length: the shortest measured N from which the method stays faster than dense (CAB). "
        f"FLOP model: {_esc(FLOP_MODEL)} Peak memory: {_esc(MEMORY_METHOD.get(device, MEMORY_METHOD['cpu']))}. "
        "N^x: least-squares growth exponent over the measured lengths (1 = linear).</p>")
    parts.append("<h2>Compatibility: CAB's four patterns</h2><p class='note'>Whether each method supports each "
                 "pattern of the Comprehensive Attention Benchmark (its declared support) and, where this run measured "
                 "it, its efficiency length there (forward). Cross-attention: N keys and N/"
                 f"{CROSS_QUERY_DIVISOR} queries, causal aligned bottom-right. attnzoo bench --pattern all measures "
                 "every cell.</p>" + _compatibility_table(results))
    parts.append("<h2>Summary</h2>" + _summary_table(results))
    parts.append("<h2>Plots</h2>")
    points = _pareto_points(results, quality)
    if plt is None:
        parts.append(f"<p class='noplots'>{PLOTS_HINT}</p>")
    else:
        parts.extend(_length_plots(results, plt))
        if points:
            parts.append(_pareto_plot(points, plt))
        parts.extend(_heatmap_plots(heatmaps, plt))
    if not quality:
        parts.append(f"<p class='note'>{QUALITY_HINT}</p>")
    else:
        parts.append("<h2>Quality</h2><p class='note'>rel_error: ||out - exact|| / ||exact|| on captured q/k/v (mean over "
                     "layers); mass_recall: exact attention probability on the pairs the method attends to; perplexity and "
                     "passkey_accuracy: the model patched with the method, end to end.</p>"
                     + _quality_pivot(quality) + "<h3>All quality rows</h3>" + _quality_table(quality))
    parts.append("<h2>All measurements</h2>" + _results_table(results))
    parts.append("</body></html>")
    return "\n".join(parts)


FIGURE = re.compile(r'<figure id="([\w-]+)"><img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def save_plots(page: str, folder: str | Path) -> list[Path]:
    """Write every plot of a rendered report as ``folder/<plot id>.png`` (for READMEs and slides)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for plot_id, data in FIGURE.findall(page):
        paths.append(folder / f"{plot_id}.png")
        paths[-1].write_bytes(base64.b64decode(data))
    return paths


def write_report(store: Store, run_id: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(store.export(run_id)), encoding="utf-8")
    return path


# ---- a long generation under a fixed KV budget (benchmarks/cache_streaming.py) ----------------
def cache_streaming_report(samples: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """HTML of a long generation under a fixed cache budget: the cache's bytes and the process's
    RSS against the tokens generated (one figure, id ``plot-cache-streaming``) and the samples'
    table. ``samples``: dicts with ``step``, ``cache_bytes``, ``rss_mb``, ``decode_ms``; ``info``:
    the run's facts (command, machine, date), shown first."""
    plt = _matplotlib()
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>attnzoo cache streaming</title><style>{CSS}</style></head><body>",
             "<h1>KV cache under a fixed budget over a long generation</h1>",
             _table(["", ""], [f'<tr><td class="l">{_esc(k)}</td><td class="l">{_esc(v)}</td></tr>' for k, v in info.items()], "run")]
    if plt is None:
        parts.append(f"<p class='noplots'>{PLOTS_HINT}</p>")
    elif samples:
        steps = [s["step"] for s in samples]
        fig, cache = plt.subplots(figsize=(6.5, 3.6))
        rss = cache.twinx()  # the cache is a small part of the process: each on its own axis, both from 0
        for axis, values, label, color in ((cache, [s["cache_bytes"] / 2**20 for s in samples], "KV cache MB (its tensors)", "C0"),
                                           (rss, [s["rss_mb"] for s in samples], "process RSS MB", "C1")):
            axis.plot(steps, values, marker=".", color=color)
            axis.set_ylabel(label, color=color)
            axis.set_ylim(0, 1.15 * max(values))
        cache.set_xlabel("generated tokens")
        parts.append(_figure("plot-cache-streaming", "cache bytes and RSS against generated tokens", _png(fig, plt)))
    rows = [f"<tr><td class='l'>{s['step']}</td><td>{s['cache_bytes']}</td><td>{s['rss_mb']:.1f}</td><td>{s['decode_ms']:.1f}</td></tr>"
            for s in samples]
    parts.append(_table(["generated tokens", "cache bytes", "RSS MB", "decode ms/token (since the last sample)"], rows, "samples"))
    parts.append("</body></html>")
    return "\n".join(parts)
