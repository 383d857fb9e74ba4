"""Block-structure construction cost of every position-pattern method (the foundation issue's target:
under 50 ms at N = 16,384), and how it grows with N.

For each method and length it times, on fresh method objects (medians of repeats):
  layout_ms  building the block structure (key lists per query block) analytically;
  setup_ms   what the first call costs beyond a later one (the executor's plan on top of the block
             structure: token masks of the visited blocks grouped into shared mask classes; cached);
  layout_MB  the size of the block structure.

    python benchmarks/layout_build.py [--lengths 4096,16384,65536] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

import attnzoo
from attnzoo.method import check_qkv

# (name, config, causal); spatial methods get a square grid (or T x H x W) of N tokens
CASES = [
    ("sliding_window", dict(window=512), True),
    ("streaming", dict(sinks=4, window=1024), True),
    ("s2", dict(), True),
    ("moa", dict(spans=[256, 512, 1024, 2048] * 2, sinks=64), True),
    ("neighborhood", dict(kernel_size=13), False),
    ("neighborhood", dict(kernel_size=(3, 7, 7), grid="3d"), False),
    ("clear", dict(radius=8.0), False),
    ("halo", dict(block_size=8, halo=3), False),
    ("maxvit_block", dict(block_size=8), False),
    ("maxvit_grid", dict(grid_size=8), False),
]


def grid_for(n: int, kind: str | None, name: str):
    if name not in ("neighborhood", "clear", "halo", "maxvit_block", "maxvit_grid"):
        return None
    if kind == "3d":
        t = 4
        side = math.isqrt(n // t)
        return (t, side, side) if t * side * side == n else None
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(name: str, config: dict, causal: bool, n: int, repeats: int) -> dict | None:
    config = dict(config)
    grid = grid_for(n, config.pop("grid", None), name)
    if name in ("neighborhood", "clear", "halo", "maxvit_block", "maxvit_grid"):
        if grid is None:
            return None
        config["grid"] = grid
    q = torch.empty(1, 8, n, 64)
    call = check_qkv(q, q, q, causal=causal, scale=None, check_finite=False)
    layout_ms = median_ms(lambda: attnzoo.get_method(name, **config).layout(call), repeats)
    layout = attnzoo.get_method(name, **config).layout(call)
    q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
    setups = []
    for _ in range(max(1, repeats // 2)):
        method = attnzoo.get_method(name, **config)
        with torch.no_grad():
            first = median_ms(lambda: method(q, k, v, causal=causal), 1)
            later = median_ms(lambda: method(q, k, v, causal=causal), 3)
        setups.append(first - later)
    size = sum(t.numel() * t.element_size() for t in (layout.kv_indices, layout.kv_counts))
    return {"method": name, "config": {k: v for k, v in config.items()}, "causal": causal, "n": n,
            "layout_ms": layout_ms, "setup_ms": statistics.median(setups), "layout_MB": size / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,16384,65536")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'method':34s} {'N':>6s} {'layout ms':>10s} {'setup ms':>9s} {'layout MB':>10s}")
    for name, config, causal in CASES:
        for n in (int(x) for x in args.lengths.split(",")):
            row = measure(name, config, causal, n, args.repeats)
            if row is None:
                continue
            rows.append(row)
            label = name + ("" if not row["config"] else " " + ",".join(f"{k}={v}" for k, v in row["config"].items() if k != "spans"))
            print(f"{label[:34]:34s} {n:6d} {row['layout_ms']:10.1f} {row['setup_ms']:9.1f} {row['layout_MB']:10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch_threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
