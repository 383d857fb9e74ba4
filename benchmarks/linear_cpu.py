"""CPU acceptance figures of the linear family (issue 5).

    python benchmarks/linear_cpu.py [--threads 2] [--repeats 5] [--speed-n 16384] [--memory-n 262144]

1. Speed: causal linear attention (the shared chunked executor, through ``attnzoo.attention``)
   against dense ``scaled_dot_product_attention(..., is_causal=True)`` at N = --speed-n, B=1, H=8,
   D=64, float32, on --threads threads; method and SDPA interleaved in one process, medians of
   --repeats (target: >= 10x faster).
2. Memory: one causal run at N = --memory-n (H=8, D=64, float32, no grad) in a fresh subprocess;
   peak resident memory from ``getrusage(RUSAGE_SELF).ru_maxrss``, before (inputs) and after the run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import attnzoo

METHODS = [("linear", {}), ("lightning", {"decay": "alibi"}), ("performer", {"num_features": 64})]


def inputs(n: int, heads: int = 8, dim: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, n, dim, generator=gen) for _ in range(3))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(n: int, repeats: int) -> None:
    q, k, v = inputs(n)
    runs = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    for name, cfg in METHODS:
        runs[name] = lambda name=name, cfg=cfg: attnzoo.attention(q, k, v, name, causal=True, **cfg)
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        times = {key: [] for key in runs}
        for _ in range(repeats):
            for key, fn in runs.items():
                times[key].append(timed(fn))
    base = statistics.median(times["sdpa"])
    print(f"causal, B=1 H=8 D=64 float32, N={n}, {torch.get_num_threads()} threads, median of {repeats}")
    print(f"  {'dense sdpa':28s} {base * 1e3:10.1f} ms")
    for (name, cfg), key in zip(METHODS, list(runs)[1:]):
        t = statistics.median(times[key])
        label = name + "".join(f" {k}={v}" for k, v in cfg.items())
        print(f"  {label:28s} {t * 1e3:10.1f} ms   {base / t:6.1f}x faster than sdpa")


def memory_child(n: int) -> None:
    q, k, v = inputs(n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.no_grad():
        out = attnzoo.attention(q, k, v, "linear", causal=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ok = bool(torch.isfinite(out).all())
    print(json.dumps({"n": n, "inputs_gib": 3 * q.numel() * 4 / 2**30, "rss_before_gib": before / 2**20,
                      "rss_peak_gib": peak / 2**20, "seconds": seconds, "finite": ok}))


def memory(n: int, threads: int) -> None:
    cmd = [sys.executable, __file__, "--memory-child", str(n), "--threads", str(threads)]
    res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    print(f"causal linear (elu+1), B=1 H=8 D=64 float32, N={n}: q/k/v {res['inputs_gib']:.2f} GiB; peak RSS "
          f"{res['rss_before_gib']:.2f} GiB after inputs, {res['rss_peak_gib']:.2f} GiB after the call "
          f"({res['seconds']:.1f} s, finite={res['finite']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--speed-n", type=int, default=16384)
    ap.add_argument("--memory-n", type=int, default=262144)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child)
        return
    if not args.skip_speed:
        speed(args.speed_n, args.repeats)
    if not args.skip_memory:
        memory(args.memory_n, args.threads)


if __name__ == "__main__":
    main()
