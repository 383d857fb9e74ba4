"""``attnzoo bench --world-size W``: context-parallel attention on CPU processes (gloo), timed, its
traffic counted, and a scaling model fitted to the runs.

Each method runs on 1, 2, 4, ... up to W processes at each length: the forward's wall time (the
slowest rank, median over repeats) and the bytes and messages each rank sends (counted by
:func:`attnzoo.distributed.counting`; the worst rank). The model

    time = alpha * messages + beta * bytes + gamma_strategy * computed pairs

(latency, bandwidth, compute per (query, key) pair, no overlap assumed) is fitted by non-negative
least squares on relative error over the runs with W >= 2; its volumes at other (W, N) come from the
same plans the exchanges run (:func:`plan_volume`, checked here against the counted bytes), so a
prediction at 64 ranks and 1M tokens is the fitted constants times exact volumes: a model, with
this machine's constants, not a measurement.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..bench.specs import MethodSpec, config_at, parse_method_spec
from ..registry import get_method
from .api import attention, distributed_forms, whole_call
from .comm import counting, free_local_port
from .halo import computed_pairs, row_size, send_plan
from .layout import split_lengths

DEFAULT_METHODS = ("dense", "sliding_window:window=256", "neighborhood:kernel_size=13")
DEFAULT_LENGTHS = (1024, 4096)
PREDICT_WORLDS = (8, 64)
PREDICT_LENGTH = 1 << 20


@dataclass
class Volume:
    """Per rank (the worst one): point-to-point messages, bytes sent, (query, key) pairs computed."""

    messages: int
    bytes: int
    pairs: int


@dataclass
class WorldRun:
    method: str
    strategy: str
    world: int
    length: int
    seconds: float  # slowest rank, median over repeats
    bytes_sent: int  # counted, worst rank
    messages: int  # counted, worst rank
    planned: Volume


def shard_lengths(m, config_call, world: int) -> list[int]:
    """Contiguous shards as even as possible in whole rows (tokens, for 1-D patterns)."""
    size = row_size(m, config_call) if distributed_forms().get(m.info.name) == "halo" else 1
    return [rows * size for rows in split_lengths(config_call.len_q // size, world)]


def _meta_call(m, length: int, heads: int, dim: int):
    meta = torch.empty(1, heads, 0, dim, device="meta")
    return whole_call(m, meta, meta, meta, length, causal=False, scale=None)


def plan_volume(spec: MethodSpec, world: int, length: int, heads: int, dim: int, element: int = 4) -> Volume:
    """The worst rank's traffic and computed pairs for ``spec`` at (``world``, ``length``), from
    the plans the distributed forms run (keys and values of ``heads`` heads of width ``dim``)."""
    m = get_method(spec.name, **config_at(spec, length))
    call = _meta_call(m, length, heads, dim)
    lengths = shard_lengths(m, call, world)
    per_token = heads * 2 * dim * element  # one token's key and value
    if distributed_forms().get(spec.name) == "halo":
        plan = send_plan(m, call, lengths)
        starts = [sum(lengths[:r]) for r in range(world)]
        pairs = [computed_pairs(m, call, s, s + n) for s, n in zip(starts, lengths)]
        return Volume(max(2 * len(p) for p in plan), max(sum(b - a for _, a, b in p) for p in plan) * per_token, max(pairs))
    forwarded = [length - lengths[(r + 1) % world] for r in range(world)]  # every block but the next rank's
    return Volume(2 * (world - 1), max(forwarded) * per_token if world > 1 else 0, max(n * length for n in lengths))


def _worker(rank: int, world: int, port: int, specs, lengths, heads: int, dim: int, repeats: int, out_path: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = []
    try:
        for name, config in specs:
            spec = MethodSpec(name, config)
            for length in lengths:
                cfg = config_at(spec, length)
                m = get_method(name, **cfg)
                n = shard_lengths(m, _meta_call(m, length, heads, dim), world)[rank]
                gen = torch.Generator().manual_seed(rank)
                q, k, v = (torch.randn(1, heads, n, dim, generator=gen) for _ in range(3))
                with torch.no_grad():
                    with counting() as traffic:
                        attention(q, k, v, m)  # also the warm-up
                    times = []
                    for _ in range(repeats):
                        dist.barrier()
                        start = time.perf_counter()
                        attention(q, k, v, m)
                        times.append(time.perf_counter() - start)
                worst = torch.tensor([traffic.sent, traffic.messages, *times], dtype=torch.float64)
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # per repeat: the slowest rank
                seconds = statistics.median(worst[2:].tolist())
                rows.append(asdict(WorldRun(spec.key, distributed_forms().get(name, "ulysses") if world > 1 else "local", world,
                                            length, seconds, int(worst[0]), int(worst[1]),
                                            plan_volume(spec, world, length, heads, dim))))
        if rank == 0:
            Path(out_path).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def measure(specs: list[MethodSpec], worlds: list[int], lengths: list[int], *, heads: int, dim: int, repeats: int,
            scratch: Path) -> list[dict]:
    """Every (method, world, length) run, one spawn of ``world`` gloo processes per world size."""
    import torch.multiprocessing as mp

    rows = []
    for world in worlds:
        out = scratch / f"world{world}.json"
        mp.spawn(_worker, args=(world, free_local_port(), [(s.name, s.config) for s in specs], lengths, heads, dim, repeats,
                                str(out)), nprocs=world, join=True)
        rows += json.loads(out.read_text())
    return rows


def _features(volume: dict, strategy: str) -> list[float]:
    return [volume["messages"], volume["bytes"], volume["pairs"] * (strategy == "ring"), volume["pairs"] * (strategy == "halo")]


FEATURES = ("alpha_s_per_message", "beta_s_per_byte", "gamma_ring_s_per_pair", "gamma_halo_s_per_pair")


def fit(rows: list[dict]) -> dict[str, float]:
    """Non-negative least squares on relative error over the distributed runs (W >= 2)."""
    runs = [r for r in rows if r["world"] > 1 and r["strategy"] in ("ring", "halo")]
    x = np.array([_features(r["planned"], r["strategy"]) for r in runs], dtype=float)
    y = np.array([r["seconds"] for r in runs], dtype=float)
    x, y = x / y[:, None], np.ones_like(y)  # relative error: every run weighs the same
    active = [j for j in range(x.shape[1]) if x[:, j].any()]
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (coef >= 0).all() or not active:
            break
        active = [j for j, c in zip(active, coef) if c > 0]
    out = dict.fromkeys(FEATURES, 0.0)
    out.update({FEATURES[j]: float(c) for j, c in zip(active, coef)})
    return out


def predict(model: dict[str, float], volume: Volume | dict, strategy: str) -> float:
    v = asdict(volume) if isinstance(volume, Volume) else volume
    return float(np.dot([model[f] for f in FEATURES], _features(v, strategy)))


def report(rows: list[dict], model: dict[str, float], specs: list[MethodSpec], *, heads: int, dim: int) -> dict:
    """The runs with the model's fit, the counted-vs-planned bytes, and predictions at 8 / 64 ranks, 1M tokens."""
    for r in rows:
        if r["world"] > 1:
            r["model_seconds"] = predict(model, r["planned"], r["strategy"])
    predictions = []
    for spec in specs:
        strategy = distributed_forms().get(spec.name)
        if strategy not in ("ring", "halo"):
            continue
        for world in PREDICT_WORLDS:
            volume = plan_volume(spec, world, PREDICT_LENGTH, heads, dim)
            predictions.append({"method": spec.key, "world": world, "length": PREDICT_LENGTH, **asdict(volume),
                                "model_seconds": predict(model, volume, strategy)})
    mismatch = max((abs(r["bytes_sent"] - r["planned"]["bytes"]) / max(1, r["planned"]["bytes"]) for r in rows if r["world"] > 1),
                   default=0.0)
    return {"runs": rows, "model": model, "bytes_counted_vs_planned_max_rel": mismatch, "predictions": predictions,
            "heads": heads, "dim": dim}


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def print_report(result: dict) -> None:
    print(f"{'method':34} {'W':>3} {'N':>7} {'ms':>9} {'model ms':>9} {'sent/rank':>10} {'msgs':>5}")
    for r in result["runs"]:
        model = f"{r['model_seconds'] * 1e3:9.1f}" if "model_seconds" in r else f"{'':9}"
        print(f"{r['method'][:34]:34} {r['world']:3d} {r['length']:7d} {r['seconds'] * 1e3:9.1f} {model} "
              f"{_human_bytes(r['bytes_sent']):>10} {r['messages']:5d}")
    print("model (fitted on these runs, W >= 2): " + ", ".join(f"{k} = {v:.3g}" for k, v in result["model"].items()))
    print(f"counted bytes vs the plans: max relative difference {result['bytes_counted_vs_planned_max_rel']:.2g}")
    print(f"MODEL prediction at {PREDICT_LENGTH} tokens (this machine's fitted constants, exact planned volumes):")
    for p in result["predictions"]:
        print(f"  {p['method'][:34]:34} W={p['world']:3d}: {p['model_seconds']:10.3f} s, {_human_bytes(p['bytes'])} sent/rank, "
              f"{p['messages']} messages, {p['pairs']:.3g} pairs/rank")


def world_command(args) -> int:
    """``attnzoo bench --world-size W`` (uses --method, --lengths, --heads, --dim, --repeats, --out)."""
    specs = [parse_method_spec(t) for t in (args.method or DEFAULT_METHODS)]
    worlds = sorted({2 ** i for i in range(int(math.log2(args.world_size)) + 1)} | {args.world_size})
    lengths = list(args.lengths or DEFAULT_LENGTHS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = measure(specs, worlds, lengths, heads=args.heads, dim=args.dim, repeats=args.repeats, scratch=out)
    result = report(rows, fit(rows), specs, heads=args.heads, dim=args.dim)
    (out / "distributed.json").write_text(json.dumps(result, indent=1))
    print_report(result)
    print(f"results: {(out / 'distributed.json').resolve()}")
    return 0
