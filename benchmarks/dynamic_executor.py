"""Block-granular executor (kernels/block_sparse/blocks.py) against the generic gather executor and
dense SDPA, on S2-Attention's per-head block layout (CPU, float32).

    python benchmarks/dynamic_executor.py [--n 16384] [--heads 8] [--dim 64] [--threads 2] [--repeats 3]

Prints medians of ``--repeats`` runs, all measured in the same process (ratios are what matter on a
shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.kernels.block_sparse.blocks import block_attention
from attnzoo.kernels.block_sparse.gather import gather_attention
from attnzoo.method import check_qkv


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: builds and caches static plans
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, a.heads, a.n, a.dim, generator=gen) for _ in range(3))
    s2 = attnzoo.get_method("s2")
    call = check_qkv(q, k, v, causal=True, scale=None)
    layout = s2.layout(call)
    _, stats = s2(q, k, v, causal=True, return_stats=True)
    dense = median_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), a.repeats)
    gather = median_seconds(lambda: gather_attention(q, k, v, layout, scale=call.scale), a.repeats)
    blocks = median_seconds(lambda: block_attention(q, k, v, layout, scale=call.scale), a.repeats)
    public = median_seconds(lambda: attnzoo.attention(q, k, v, "s2", causal=True), a.repeats)
    print(f"s2 causal N={a.n} H={a.heads} D={a.dim} float32, {a.threads} threads, density {stats.density:.3f}")
    print(f"dense SDPA        {dense * 1e3:9.1f} ms")
    print(f"s2 gather (before){gather * 1e3:9.1f} ms  {dense / gather:5.2f}x dense")
    print(f"s2 blocks (after) {blocks * 1e3:9.1f} ms  {dense / blocks:5.2f}x dense")
    print(f"attnzoo.attention {public * 1e3:9.1f} ms  {dense / public:5.2f}x dense")


if __name__ == "__main__":
    main()
