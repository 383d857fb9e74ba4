"""The local family's performance targets (issue 2), measured with attnzoo bench's machinery.

    python benchmarks/local_targets.py [--out DIR] [--max-len 65536] [--dense-max-len 16384]

float32, B=1, H=8, D=64, 2 CPU threads (override with --threads):
  1. sliding_window causal, window 512, vs causal dense SDPA at N = 16,384 (target: >= 6x)
  2. neighborhood 2-D, 128 x 128 grid, kernel 13, vs dense SDPA (target: >= 20x)
  3. block-structure construction at N = 16,384 (target: < 50 ms)
  4. peak memory of every local method for N = 4K .. 64K (target: linear in N)
Every measurement lands in the bench store (DIR/attnzoo.sqlite) and DIR/local-targets.html. The same
figures from the command line:
  attnzoo bench --threads 2 --lengths 16K --causal --method sliding_window:window=512
  attnzoo bench --threads 2 --lengths 16K --method neighborhood:kernel_size=13
  attnzoo bench --threads 2 --family local --lengths 4K,8K,16K,32K,64K --dense-max-len 16384 --repeats 1 \
      --max-call-seconds inf
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from attnzoo.bench import BenchOptions, Store, parse_method_spec, run_bench, write_report
from attnzoo.bench.analysis import summary, with_dense
from attnzoo.bench.specs import default_specs
from attnzoo.registry import method_class

SHAPE = dict(batch=1, heads=8, dim=64, dtype="float32")


def speed_targets(store: Store, repeats: int) -> list[str]:
    lines = []
    for spec, mode, target in (("sliding_window:window=512", "causal", 6.0), ("neighborhood:kernel_size=13", "non-causal", 20.0)):
        opts = BenchOptions(methods=[parse_method_spec(spec)], lengths=(16384,), mode=mode, repeats=repeats, **SHAPE)
        run = run_bench(opts, store).run_id
        rows = {r["method"]: r for r in with_dense(store.results(run))}
        r = rows[spec.split(":")[0]]
        verdict = "met" if r["speedup"] and r["speedup"] >= target else "NOT met"
        lines.append(f"{spec} ({mode}, grid {r['config'].get('grid', '-')}) N=16384: {r['median_ms']:.1f} ms vs dense "
                     f"{r['dense_ms']:.1f} ms = {r['speedup']:.2f}x (target {target:g}x: {verdict}); density {r['density']:.4f} "
                     f"(FLOP bound {1 / r['density']:.1f}x), sparse efficiency {r['sparse_efficiency']:.2f}  [run {run}]")
    return lines


def construction_times(repeats: int) -> list[str]:
    """Block-structure construction at N = 16,384 for every local method (benchmarks/layout_build.py)."""
    from layout_build import CASES, measure

    lines = []
    for name, config, causal in CASES:
        row = measure(name, config, causal, 16384, repeats)
        if row is not None:
            lines.append(f"block-structure construction {name} {row['config']} N=16384: {row['layout_ms']:.1f} ms "
                         f"(median of {repeats}; target < 50 ms); first-call setup {row['setup_ms']:.0f} ms")
    return lines


def memory_targets(store: Store, lengths: tuple[int, ...], dense_max_len: int) -> tuple[str, list[str]]:
    local = [s for s in default_specs() if s.name == "dense" or "local" in method_class(s.name).info.family]
    # memory is the point here: no method is cut off for being slow
    opts = BenchOptions(methods=local, lengths=lengths, repeats=1, dense_max_len=dense_max_len,
                        max_call_seconds=math.inf, **SHAPE)
    run = run_bench(opts, store).run_id
    results = store.results(run)
    lines = [f"{'method':<16}{'mode':<12}" + "".join(f"{n // 1024:>8}K" if n % 1024 == 0 else f"{n:>9}" for n in lengths) + "   MiB; growth N^x"]
    for s in summary(results):
        peaks = {r["length"]: r["peak_bytes"] for r in results if r["spec"] == s["spec"] and r["causal"] == s["causal"]
                 and r["status"] == "ok"}
        cells = "".join(f"{peaks[n] / 2**20:9.1f}" if peaks.get(n) is not None else f"{'-':>9}" for n in lengths)
        exp = "-" if s["memory_exponent"] is None else f"{s['memory_exponent']:.2f}"
        lines.append(f"{s['spec']:<16}{'causal' if s['causal'] else 'non-causal':<12}{cells}   {exp}")
    return run, lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="attnzoo-results/local-targets")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-len", type=int, default=65536)
    p.add_argument("--dense-max-len", type=int, default=16384)
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    lines = [f"attnzoo local targets, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {torch.get_num_threads()} threads, "
             f"float32 B=1 H=8 D=64"]
    with Store(out / "attnzoo.sqlite") as store:
        lines += speed_targets(store, args.repeats)
        lines += construction_times(args.repeats)
        if not args.skip_memory:
            lengths = tuple(n for n in (4096, 8192, 16384, 32768, 65536) if n <= args.max_len)
            run, table = memory_targets(store, lengths, args.dense_max_len)
            lines += [f"peak memory above the inputs (torch.profiler allocation events), run {run}:"] + table
            write_report(store, run, out / "local-targets.html")
    text = "\n".join(lines)
    (out / "local-targets.txt").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
