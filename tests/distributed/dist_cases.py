"""What every spawned rank runs: each case builds the whole inputs from its seed, computes the
single-process result with ``attnzoo.attention`` (the reference: no sharding, no exchange), then
the distributed result on this rank's shard, and records the worst forward and gradient errors
over the ranks. Imported by the spawned processes (the parent's sys.path reaches them)."""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

import attnzoo
import attnzoo.distributed as azd


@dataclass
class Case:
    name: str
    method: str = "dense"
    config: dict = field(default_factory=dict)
    causal: bool = False
    layout: str = "contiguous"
    strategy: str = "auto"
    lengths: tuple[int, ...] | int = 32  # per-rank lengths, or tokens per rank
    heads: tuple[int, int] = (4, 2)
    dim: int = 8

    def seed(self, world: int) -> int:
        return zlib.crc32(f"{self.name}/{world}".encode())

    def shard_lengths(self, world: int) -> list[int]:
        if isinstance(self.lengths, int):
            return [self.lengths] * world
        return list(self.lengths[:world])


def cases(world: int) -> list[Case]:
    """Every method with a distributed form, causal and not, even and uneven shards."""
    uneven = (13, 7, 20, 9)
    grid_rows = {2: (8, 5), 4: (16, 5)}[world]  # 4 rows of 5 tokens per rank
    return [
        Case("ring", causal=False, lengths=uneven),
        Case("ring_causal", causal=True, lengths=uneven),
        Case("ring_zigzag_causal", causal=True, layout="zigzag", lengths=12),
        Case("ring_mha_dv", heads=(2, 2), lengths=10, causal=True),
        Case("ulysses", strategy="ulysses", causal=True, lengths=uneven),
        Case("ulysses_zigzag", strategy="ulysses", causal=True, layout="zigzag", lengths=8),
        Case("ulysses_window", method="sliding_window", config={"window": 5}, strategy="ulysses", causal=True, lengths=uneven),
        Case("window", method="sliding_window", config={"window": 9}, lengths=uneven),
        Case("window_causal", method="sliding_window", config={"window": 6}, causal=True, lengths=uneven),
        Case("streaming", method="streaming", config={"sinks": 3, "window": 5}, causal=True, lengths=uneven),
        Case("neighborhood_1d", method="neighborhood", config={"kernel_size": 7, "dilation": 2}, lengths=(16, 12, 20, 14)),
        Case("neighborhood_2d", method="neighborhood", config={"grid": grid_rows, "kernel_size": 3}, lengths=20),
        Case("neighborhood_2d_causal", method="neighborhood", config={"grid": grid_rows, "kernel_size": (5, 3)}, causal=True,
             lengths=20),
        Case("neighborhood_3d", method="neighborhood", config={"grid": (2 * world, 3, 3), "kernel_size": 3}, lengths=18),
        Case("clear", method="clear", config={"grid": grid_rows, "radius": 2.5}, lengths=20),
        Case("halo", method="halo", config={"grid": grid_rows, "block_size": 3, "halo": 1}, lengths=20),
        Case("maxvit_block", method="maxvit_block", config={"grid": grid_rows, "block_size": 3}, lengths=20),
        Case("linear", method="linear", causal=False, lengths=uneven, config={"chunk": 4}),
        Case("linear_causal", method="linear", causal=True, lengths=uneven, config={"chunk": 4}),
        Case("lightning", method="lightning", causal=True, lengths=uneven, config={"chunk": 4, "decay": "alibi"}),
        Case("block_sparse", method="block_sparse", config={"block_size": 4, "top_k": 3, "estimator": "pooled_qk"}, lengths=(12, 8, 16, 8)),
        Case("block_sparse_causal", method="block_sparse", config={"block_size": 4, "top_k": 2, "local_blocks": 0, "estimator": "pooled_qk"}, causal=True,
             lengths=(12, 8, 16, 8)),
        Case("linear_relu_causal", method="linear", causal=True, lengths=uneven, config={"chunk": 8, "feature_map": "relu"}),
    ]


def _run_case(case: Case, rank: int, world: int) -> dict:
    lengths = case.shard_lengths(world)
    total = sum(lengths)
    gen = torch.Generator().manual_seed(case.seed(world))
    hq, hkv = case.heads
    q = torch.randn(2, hq, total, case.dim, generator=gen)
    k = torch.randn(2, hkv, total, case.dim, generator=gen)
    v = torch.randn(2, hkv, total, case.dim + 2, generator=gen)
    weight = torch.randn(2, hq, total, case.dim + 2, generator=gen)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = attnzoo.attention(*full, case.method, causal=case.causal, **case.config)
    (expected * weight).sum().backward()
    cut = lambda t: azd.shard(t, rank, world, layout=case.layout, lengths=lengths if case.layout == "contiguous" else None)  # noqa: E731
    mine = [cut(t).requires_grad_() for t in (q, k, v)]
    out = azd.attention(*mine, case.method, causal=case.causal, layout=case.layout, strategy=case.strategy, **case.config)
    (out * cut(weight)).sum().backward()
    scale = lambda t: float(t.abs().max())  # noqa: E731
    errors = [float((out - cut(expected)).detach().abs().max()) / scale(expected.detach())]
    errors += [float((m.grad - cut(f.grad)).abs().max()) / scale(f.grad) for m, f in zip(mine, full)]
    worst = torch.tensor(errors, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"forward": worst[0].item(), "grad_q": worst[1].item(), "grad_k": worst[2].item(), "grad_v": worst[3].item(),
            "seed": case.seed(world), "case": asdict(case)}


def _error_of(fn) -> str:
    try:
        fn()
    except attnzoo.AttnzooError as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _error_cases(rank: int, world: int) -> dict:
    gen = torch.Generator().manual_seed(world)
    q, k, v = (torch.randn(1, 4, 6, 8, generator=gen) for _ in range(3))
    heads = 4 if rank == 0 else 2
    wrong_heads = torch.randn(1, heads, 6, 8, generator=gen)
    uneven = torch.randn(1, 4, 6 + rank, 8, generator=gen)
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    alone = azd.attention(q, k, v, causal=True, group=singles[rank])
    local = attnzoo.attention(q, k, v, causal=True)
    return {
        "layout": _error_of(lambda: azd.attention(q, k, v, layout="diagonal")),
        "heads": _error_of(lambda: azd.attention(wrong_heads, wrong_heads, wrong_heads)),
        "zigzag_uneven": _error_of(lambda: azd.attention(uneven, uneven, uneven, causal=True, layout="zigzag")),
        "no_form": _error_of(lambda: azd.attention(q, k, v, "maxvit_grid", grid=(2, 3))),
        "halo_zigzag": _error_of(lambda: azd.attention(q, k, v, "sliding_window", window=3, layout="zigzag")),
        "grid_rows": _error_of(lambda: azd.attention(q, k, v, "neighborhood", grid=(6 * world // 4, 4), kernel_size=3)),
        "estimator": _error_of(lambda: azd.attention(q, k, v, "block_sparse", block_size=2, estimator="sampled_q")),
        "blocks": _error_of(lambda: azd.attention(q, k, v, "block_sparse", block_size=4, estimator="pooled_qk")),
        "block_size": _error_of(lambda: azd.attention(q, k, v, "block_sparse", estimator="pooled_qk")),
        "single_group_equal": bool(torch.equal(alone, local)),
    }


def sequence_parallel_layer(rank: int, world: int, method: str, **config) -> dict:
    """attnzoo.nn.Attention(process_group=WORLD) on this rank's tokens against the same layer on the
    whole sequence: worst relative error of the output and of the parameters' gradients summed
    over the ranks (causal, GQA, rotary embeddings at the shard's positions, uneven shards)."""
    torch.manual_seed(7)
    options = dict(num_kv_heads=2, causal=True, rope=10000.0, method=method, **config)
    layer = attnzoo.nn.Attention(16, 4, process_group=dist.group.WORLD, **options)
    whole = attnzoo.nn.Attention(16, 4, **options)
    whole.load_state_dict(layer.state_dict())
    lengths = [9, 5, 12, 6][:world]
    gen = torch.Generator().manual_seed(11)
    x, weight = torch.randn(2, sum(lengths), 16, generator=gen), torch.randn(2, sum(lengths), 16, generator=gen)
    expected = whole(x)
    (expected * weight).sum().backward()
    cut = lambda t: azd.shard(t, rank, world, dim=1, lengths=lengths)  # noqa: E731
    out = layer(cut(x))
    (out * cut(weight)).sum().backward()
    errors = [float((out - cut(expected)).detach().abs().max() / expected.detach().abs().max())]
    for (name, p), (_, ref) in zip(layer.named_parameters(), whole.named_parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)  # sequence parallelism sums the parameters' gradients, as data parallelism does
        errors.append(float((grad - ref.grad).abs().max() / ref.grad.abs().max()))
    worst = torch.tensor(max(errors), dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"worst": worst.item()}


def traffic(rank: int, world: int, side: int = 256, kernel: int = 13, dim: int = 4) -> dict:
    """Bytes each rank sends in one forward: halo exchange of ``neighborhood`` on a side x side grid
    (sharded by rows) against its halo's size ((kernel // 2) rows of keys and values per
    neighbour), and ring attention against (W - 1) / W of K and V (a smaller sequence: the
    ring's volume does not depend on how long computing takes)."""
    gen = torch.Generator().manual_seed(1234)
    n = side * side // world
    q, k, v = (torch.randn(1, 1, n, dim, generator=gen) for _ in range(3))
    with torch.no_grad(), azd.counting() as halo:
        azd.attention(q, k, v, "neighborhood", grid=(side, side), kernel_size=kernel)
    neighbours = (rank > 0) + (rank < world - 1)
    halo_size = neighbours * (kernel // 2) * side * 2 * dim * 4  # rows x tokens per row x (K + V) x float32
    ring_n = 1024 // world
    q, k, v = (torch.randn(1, 1, ring_n, dim, generator=gen) for _ in range(3))
    with torch.no_grad(), azd.counting() as ring:
        azd.attention(q, k, v, "dense")
    kv_bytes = world * ring_n * 2 * dim * 4  # the whole sequence's K and V
    with torch.no_grad(), azd.counting() as selection:  # top_k 2, causal: only the diagonal and the first block
        azd.attention(q, k, v, "block_sparse", causal=True, block_size=32, top_k=2, local_blocks=0, estimator="pooled_qk")
    first_block = (world - 1) * 32 * 2 * dim * 4 if rank == 0 else 0  # rank 0 sends block 0 to every other rank
    blocks = ring_n // 32
    summaries = (world - 1) * (blocks * dim * 4 + world * blocks)  # key block means, then which blocks each rank wants
    ratios = torch.tensor([halo.sent / halo_size, ring.sent / (kv_bytes * (world - 1) / world),
                           selection.sent - first_block - summaries, selection.sent / ring.sent], dtype=torch.float64)
    every = [torch.empty_like(ratios) for _ in range(world)]
    dist.all_gather(every, ratios)
    return {"halo_ratio": [float(r[0]) for r in every], "ring_ratio": [float(r[1]) for r in every],
            "selection_excess": [float(r[2]) for r in every], "selection_over_ring": [float(r[3]) for r in every]}


def worker(rank: int, world: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {case.name: _run_case(case, rank, world) for case in cases(world)}
        results["errors"] = _error_cases(rank, world)
        results["layer_dense"] = sequence_parallel_layer(rank, world, "dense")
        results["layer_window"] = sequence_parallel_layer(rank, world, "sliding_window", window=4)
        if world == 4:
            results["traffic"] = traffic(rank, world)
        if rank == 0:
            with open(out_path + ".tmp", "w") as f:
                json.dump(results, f)
            os.replace(out_path + ".tmp", out_path)
    finally:
        dist.destroy_process_group()
