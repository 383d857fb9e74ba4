"""``attnzoo bench``, ``attnzoo report`` and ``attnzoo compare``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..errors import AttnzooError, InvalidArgumentError
from .analysis import compare_runs, compatibility, summary, with_dense
from .patterns import BY_NAME, CROSS_QUERY_DIVISOR, parse_patterns
from .report import declared_support, matrix_cell, save_plots, write_report
from .runner import CPU_LENGTHS, CUDA_LENGTHS, DTYPES, MODES, BenchOptions, run_bench
from .specs import default_specs, parse_method_spec
from .store import NotStoredError, Store

DEFAULT_OUT = "attnzoo-results"
STORE_NAME = "attnzoo.sqlite"


def parse_lengths(text: str) -> tuple[int, ...]:
    """``"1K,4K,16384"`` -> (1024, 4096, 16384)."""
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        mult = 1024 if part.endswith("K") else 1
        digits = part[:-1] if mult > 1 else part
        if not digits.isdigit() or int(digits) == 0:
            raise argparse.ArgumentTypeError(f"--lengths: expected positive integers like 1024 or 4K, got {part!r}")
        out.append(int(digits) * mult)
    return tuple(out)


def _patterns(text: str) -> tuple[str, ...]:
    try:
        return parse_patterns(text)
    except AttnzooError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _human(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="speed, memory (and quality) of every method against dense; HTML report",
                              description="Measure attention methods against dense SDPA over a sweep of lengths; "
                                          "results go to a SQLite store, the report to one HTML file.")
    p.add_argument("--method", action="append", default=[], metavar="NAME[:key=value,...]",
                   help="a method and its config, repeatable (default: every registered method), "
                        "e.g. sliding_window:window=512 neighborhood:kernel_size=13")
    p.add_argument("--family", action="append", default=[], help="only methods of this family (repeatable)")
    p.add_argument("--lengths", type=parse_lengths, help=f"comma list, e.g. 1K,4K,16K (default CPU {','.join(map(_human, CPU_LENGTHS))}; "
                                                          f"cuda {','.join(map(_human, CUDA_LENGTHS))})")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, help="key/value heads (GQA); default = --heads")
    p.add_argument("--dim", type=int, default=64, help="head dimension")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--causal", dest="mode", action="store_const", const="causal", default="auto", help="every method causal (= --mode causal)")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="auto: each method non-causal where it can, else causal; dense in every mode needed")
    p.add_argument("--pattern", type=_patterns, metavar="NAME[,NAME...]",
                   help=f"CAB's patterns every method runs, instead of --mode: {', '.join(BY_NAME)} or all "
                        f"(cross: N keys, N/{CROSS_QUERY_DIVISOR} queries); unsupported ones are recorded as skipped")
    p.add_argument("--backward", action="store_true", help="also time forward+backward")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after the setup call (median reported)")
    p.add_argument("--max-seconds", type=float, default=10.0, help="stop repeating (after 3) once repeats took this long")
    p.add_argument("--max-call-seconds", type=float, default=10.0,
                   help="skip a method's longer lengths once one call takes longer than this")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory call")
    p.add_argument("--dense-max-len", type=int, help="skip dense above this length")
    p.add_argument("--quality", choices=("none", "quick", "full"), default="none",
                   help="quality stage on real models (needs attnzoo[models]); default none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-size", type=int, help="context-parallel runs on 1, 2, 4, ... W CPU processes (gloo): time, "
                                                  "bytes sent per rank, a fitted scaling model (attnzoo.distributed.bench)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT}/)")
    p.add_argument("--store", help=f"SQLite store (default OUT/{STORE_NAME}; runs accumulate)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=bench_command)

    r = subparsers.add_parser("report", help="rebuild the HTML report of a stored run")
    r.add_argument("--store", default=f"{DEFAULT_OUT}/{STORE_NAME}")
    r.add_argument("--run", help="run id or unique prefix (default: the latest)")
    r.add_argument("--out", help="HTML path (default: report-RUN.html beside the store)")
    r.add_argument("--json", help="also export the run as JSON to this path")
    r.add_argument("--plots", help="also write every plot as PNG into this folder")
    r.add_argument("--list", action="store_true", help="list the stored runs and exit")
    r.set_defaults(func=report_command)

    c = subparsers.add_parser("compare", help="what changed between two stored runs (time and memory ratios B / A)")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.add_argument("--store", default=f"{DEFAULT_OUT}/{STORE_NAME}")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=compare_command)


def _options(args: argparse.Namespace) -> BenchOptions:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("--device", "a device this machine has (torch.cuda.is_available() is False)", args.device)
    specs = [parse_method_spec(s) for s in args.method] or default_specs()
    if args.family:
        from ..registry import method_class

        specs = [s for s in specs if s.name == "dense" or set(method_class(s.name).info.family) & set(args.family)]
    return BenchOptions(
        methods=specs, lengths=args.lengths or (CUDA_LENGTHS if device.type == "cuda" else CPU_LENGTHS),
        batch=args.batch, heads=args.heads, heads_kv=args.kv_heads, dim=args.dim,
        dtype=args.dtype or ("bfloat16" if device.type == "cuda" else "float32"), device=args.device,
        mode=args.mode, patterns=args.pattern, backward=args.backward, repeats=args.repeats, max_seconds=args.max_seconds,
        max_call_seconds=args.max_call_seconds,
        memory=args.memory, dense_max_len=args.dense_max_len, seed=args.seed)


def bench_command(args: argparse.Namespace) -> int:
    if args.world_size:
        from ..distributed.bench import world_command

        return world_command(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        opts = _options(args)
    except AttnzooError as exc:
        print(f"attnzoo bench: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    store_path = Path(args.store) if args.store else out / STORE_NAME
    print(f"attnzoo bench: {len(opts.methods)} methods, lengths {', '.join(map(_human, opts.lengths))}, "
          f"B={opts.batch} H={opts.heads} D={opts.dim} {opts.dtype} on {opts.device} ({torch.get_num_threads()} threads), "
          f"{'forward and forward+backward' if opts.backward else 'forward'}, quality {args.quality}", flush=True)
    if args.lengths is None and torch.device(opts.device).type == "cpu":
        print("  default CPU sweep stops at 16K so it finishes in minutes; longer: --lengths 1K,4K,16K,64K", flush=True)
    with Store(store_path) as store:
        outcome = run_bench(opts, store, progress=args.progress)
        if args.quality != "none" and outcome.status == "complete":
            from .quality import run_quality

            outcome.status = run_quality(store, outcome.run_id, opts, level=args.quality, progress=args.progress)
        elif args.quality == "none":
            print("quality: none (add --quality quick for error, recall and perplexity on SmolLM2-135M and MiniLM)", flush=True)
        results = store.results(outcome.run_id)
        print_results(results)
        report = write_report(store, outcome.run_id, out / "report.html")
        js = store.export_json(outcome.run_id, out / "results.json")
    print(f"\nrun {outcome.run_id}: {outcome.status}, {outcome.measured} measurements")
    print(f"report: {report.resolve()}")
    print(f"store:  {store_path.resolve()} (JSON of this run: {js.resolve()})")
    if outcome.status == "interrupted":
        print("interrupted: everything measured so far is in the store and the report", file=sys.stderr)
        return 130
    return 0


def print_results(results: list[dict]) -> None:
    """The on-screen table: one line per measurement, then one per method (efficiency length etc.)."""
    rows = [("N", "method", "pattern", "pass", "ms", "x dense", "density", "sparse eff", "TFLOP/s", "peak MiB", "status")]
    f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    for r in with_dense(results):
        rows.append((str(r["length"]), r["spec"], r["pattern"], r["pass"],
                     f(r["median_ms"], ".2f"), f(r["speedup"], ".2f"), f(r["density"], ".3f"),
                     f(r["sparse_efficiency"], ".2f"), f(r["tflops"], ".3f"),
                     "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}",
                     r["status"] if r["status"] == "ok" else f"{r['status']}: {(r['message'] or '')[:60]}"))
    _print_table(rows)
    print()
    rows = [("method", "pattern", "pass", "efficiency length", "x dense @N", "sparse eff", "time ~N^x", "memory ~N^x")]
    for s in summary(results):
        if s["method"] == "dense":
            continue
        rows.append((s["spec"], s["pattern"], s["pass"],
                     "-" if s["efficiency_length"] is None else str(s["efficiency_length"]),
                     "-" if s["speedup"] is None else f"{s['speedup']:.2f} @{s['at_length']}",
                     f(s["sparse_efficiency"], ".2f"), f(s["time_exponent"], ".2f"), f(s["memory_exponent"], ".2f")))
    _print_table(rows)
    print()
    rows = [("compatibility", *BY_NAME)]
    for row in compatibility(results, declared_support(results)):
        rows.append((row["spec"], *(matrix_cell(row["cells"][p], row["method"])[:48] for p in BY_NAME)))
    _print_table(rows)


def _print_table(rows) -> None:
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def _open_store(path: str) -> Store:
    if not Path(path).exists():
        raise NotStoredError(f"no store at {path} (run attnzoo bench first, or pass --store)")
    return Store(path)


def _lookup_errors(command):
    """Print a missing store or run as ``attnzoo CMD: message`` and exit 2 instead of a traceback."""
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except NotStoredError as exc:
            print(f"attnzoo {args.command}: {exc}", file=sys.stderr)
            return 2
    return run


@_lookup_errors
def report_command(args: argparse.Namespace) -> int:
    with _open_store(args.store) as store:
        if args.list:
            for r in store.runs():
                n = len(store.results(r["id"]))
                print(f"{r['id']}  {r['status']:<11}  {n:4d} measurements  {r['machine'].get('cpu')}  "
                      f"torch {r['machine'].get('torch')}  commit {(r['machine'].get('git_commit') or '-')[:12]}")
            return 0
        run = store.run(args.run)
        out = Path(args.out) if args.out else store.path.parent / f"report-{run['id']}.html"
        report = write_report(store, run["id"], out)
        print(f"report: {report.resolve()}")
        if args.plots:
            for plot in save_plots(report.read_text(encoding="utf-8"), args.plots):
                print(f"plot:   {plot.resolve()}")
        if args.json:
            print(f"json:   {store.export_json(run['id'], args.json).resolve()}")
    return 0


@_lookup_errors
def compare_command(args: argparse.Namespace) -> int:
    with _open_store(args.store) as store:
        a, b = store.run(args.run_a), store.run(args.run_b)
        rows = compare_runs(store.results(a["id"]), store.results(b["id"]))
    if args.json:
        print(json.dumps({"a": a, "b": b, "rows": rows}, indent=1, default=str))
        return 0
    for label, run in (("A", a), ("B", b)):
        m = run["machine"]
        print(f"{label}: {run['id']} ({run['status']}) {m.get('cpu')}, {m.get('threads')} threads, gpu {m.get('gpu')}, "
              f"torch {m.get('torch')}, attnzoo {m.get('attnzoo')}, commit {(m.get('git_commit') or '-')[:12]}")
    f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    table = [("method", "N", "pattern", "pass", "ms A", "ms B", "time B/A", "peak B/A", "status A -> B")]
    for r in rows:
        status = r["status_a"] if r["status_a"] == r["status_b"] else f"{r['status_a']} -> {r['status_b']}"
        table.append((r["spec"], str(r["length"]), r["pattern"], r["pass"],
                      f(r["ms_a"], ".2f"), f(r["ms_b"], ".2f"), f(r["time_ratio"], ".2f"), f(r["memory_ratio"], ".2f"),
                      str(status)))
    _print_table(table)
    return 0

