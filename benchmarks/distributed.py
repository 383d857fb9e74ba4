"""Context parallelism on CPU processes (gloo): the README's numbers for attnzoo.distributed.

    python benchmarks/distributed.py [--world-size 4] [--lengths 1024,4096] [--heads 2] [--dim 32] [--json out.json]

1. Counted traffic on the issue's target shape: neighborhood (kernel 13) on a 256 x 256 grid over
   4 ranks, halo exchange against ring attention on the same tokens (forward, bytes each rank sent).
2. ``attnzoo bench --world-size`` runs (dense ring, sliding window and 2-D neighborhood halos on
   1, 2, 4 processes), the fitted scaling model and its prediction at 8 and 64 ranks, 1M tokens,
   printed as the README's markdown table (a model, with this machine's constants).
Wall times on a shared machine are unreliable; bytes are exact.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnzoo.distributed as azd
from attnzoo.bench.specs import parse_method_spec
from attnzoo.distributed.bench import fit, measure, print_report, report
from attnzoo.distributed.comm import free_local_port

METHODS = ("dense", "sliding_window:window=256", "neighborhood:kernel_size=13")


def _traffic_worker(rank: int, world: int, port: int, out: str, side: int, dim: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    n = side * side // world
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, 1, n, dim, generator=gen) for _ in range(3))
    sent = []
    for method, config in (("neighborhood", {"grid": (side, side), "kernel_size": 13}), ("dense", {})):
        with torch.no_grad(), azd.counting() as traffic:
            azd.attention(q, k, v, method, **config)
        sent.append(traffic.sent)
    every = [torch.zeros(2, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(every, torch.tensor(sent))
    if rank == 0:
        Path(out).write_text(json.dumps({"halo": [int(e[0]) for e in every], "ring": [int(e[1]) for e in every],
                                         "kv_bytes": side * side * 2 * dim * 4, "halo_bytes_per_neighbour": 6 * side * 2 * dim * 4}))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--lengths", default="1024,4096")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "traffic.json")
        mp.spawn(_traffic_worker, args=(4, free_local_port(), out, 256, 8), nprocs=4, join=True)
        traffic = json.loads(Path(out).read_text())
        print("neighborhood 256 x 256, kernel 13, 4 ranks, H = 1, D = 8, float32: bytes sent per rank (counted)")
        for rank, (halo, ring) in enumerate(zip(traffic["halo"], traffic["ring"])):
            neighbours = (rank > 0) + (rank < 3)
            print(f"  rank {rank}: halo {halo} B = {halo / (neighbours * traffic['halo_bytes_per_neighbour']):.3f} x "
                  f"(6 rows of K and V per neighbour); ring {ring} B = {ring / traffic['kv_bytes']:.3f} x K and V")
        specs = [parse_method_spec(t) for t in METHODS]
        worlds = sorted({1, 2, args.world_size})
        rows = measure(specs, worlds, [int(n) for n in args.lengths.split(",")], heads=args.heads, dim=args.dim,
                       repeats=args.repeats, scratch=Path(tmp))
    result = report(rows, fit(rows), specs, heads=args.heads, dim=args.dim)
    result["traffic_256"] = traffic
    print_report(result)
    print("\n| method | ranks | bytes sent / rank | messages / rank | pairs / rank | model time |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in result["predictions"]:
        print(f"| {row['method']} | {row['world']} | {row['bytes'] / 2**20:.2f} MiB | {row['messages']} | {row['pairs']:.3g} | "
              f"{row['model_seconds']:.3g} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
