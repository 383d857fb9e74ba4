"""Speed of the dynamic methods on CPU, selection included, against dense SDPA in the same run.

    python benchmarks/dynamic_speed.py speed [--n 16384] [--heads 8] [--dim 64] [--threads 2] [--repeats 3]
    python benchmarks/dynamic_speed.py speed --defaults     # the three methods with no options (budget rule)
    python benchmarks/dynamic_speed.py hip-scaling [--lengths 4096 8192 16384 32768 65536]

``speed``: causal float32, vertical_slash, block_sparse and hip at about 5% density, medians of
``--repeats`` calls through ``attnzoo.get_method`` with ``return_stats=True`` (density actually used,
selection and attention time). ``hip-scaling``: hip's selection time per length and its ratio to
N log2 N (flat when the selection is O(N log N)). Timings on a shared machine are noisy: compare
within one run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

import attnzoo

SPEED_CASES = [  # about 5% density at N = 16,384
    ("vertical_slash", dict(vertical_blocks=5, slash_blocks=6)),
    ("vertical_slash", dict(vertical_blocks=5, slash_blocks=5)),
    ("vertical_slash", dict(vertical_blocks=1, slash_blocks=6, vertical_columns=256)),  # single-token vertical lines
    ("block_sparse", dict(top_k=6)),
    ("block_sparse", dict(top_k=6, estimator="sampled_q")),
    ("block_sparse", dict(top_k=24, block_size=16, estimator="sampled_q")),  # the 4K perplexity config's blocks
    ("hip", dict(top_k=5)),
    ("hip", dict(top_k=5, query_samples=4)),
    ("hip", dict(top_k=5, branch_score="bound")),
    ("hip", dict(top_k=5, candidates=8)),
]
DEFAULT_CASES = [("vertical_slash", {}), ("block_sparse", {}), ("hip", {})]


def inputs(n: int, heads: int, dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, n, dim, generator=gen) for _ in range(3))


def timed(fn, repeats: int):
    fn()  # warm-up
    results, times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), results


def speed(a) -> None:
    q, k, v = inputs(a.n, a.heads, a.dim)
    dense, _ = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), a.repeats)
    print(f"causal float32 N={a.n} H={a.heads} D={a.dim}, {a.threads} threads, medians of {a.repeats}")
    print(f"{'dense SDPA':16s} {dense * 1e3:9.1f} ms")
    for name, cfg in DEFAULT_CASES if a.defaults else SPEED_CASES:
        method = attnzoo.get_method(name, **cfg)
        t, results = timed(lambda: method(q, k, v, causal=True, return_stats=True), a.repeats)
        stats = [s for _, s in results]
        sel = statistics.median(s.selection_ms for s in stats)
        att = statistics.median(s.attention_ms for s in stats)
        print(f"{name:16s} {t * 1e3:9.1f} ms  {dense / t:5.2f}x dense  density {stats[0].density:.3f}  "
              f"selection {sel:7.1f} ms  attention {att:8.1f} ms  {cfg or configured(method)}")


def configured(method) -> str:
    """The budget a default-configured method ran with (its None fields as the budget rule set them)."""
    return f"defaults: {method.budgets_used()}"


def hip_scaling(a) -> None:
    print(f"hip selection time, causal float32 H={a.heads} D={a.dim}, {a.threads} threads, medians of {a.repeats}")
    for cfg in (dict(top_k=8), dict(top_k=8, branch_score="bound"), dict(top_k=8, query_samples=4), dict(top_k=8, candidates=4)):
        method = attnzoo.get_method("hip", **cfg)
        for n in a.lengths:
            q, k, v = inputs(n, a.heads, a.dim)
            call = method._prepare(q, k, v, True, None)
            t, _ = timed(lambda: method._layout(q, k, call), a.repeats)
            print(f"N={n:6d}  selection {t * 1e3:8.1f} ms  per N log2 N {t * 1e9 / (n * math.log2(n)):6.2f} ns  {cfg}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["speed", "hip-scaling"])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    p.add_argument("--defaults", action="store_true", help="speed: the methods with no options instead of the cases")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    (speed if a.what == "speed" else hip_scaling)(a)


if __name__ == "__main__":
    main()
