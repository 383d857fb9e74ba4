"""Spatial methods swapped into ``vit-digits`` training-free: test accuracy beside dense, and the attention time of
each at the model's token count and at 4x and 16x the tokens (a larger input grid).

    python benchmarks/vision_swaps.py [--methods neighborhood agent ...] [--repeats 3] [--threads 1] [--markdown]

Accuracy: the shipped dense-trained weights with every block's attention replaced (learned methods at
their initial state). Time: one attention call (B=1, the model's heads and head size) on random inputs
laid out on a 16 x 16, 32 x 32 and 64 x 64 grid, as the speed-up over dense attention: the median of
``--repeats`` rounds, each timing dense and the method back to back (on a shared machine the load
changes between rounds, less within one).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

import attnzoo
from attnzoo.registry import method_class

# options per method for a grid whose sides are multiples of 16 (the model's is 16 x 16)
CONFIGS = {
    "neighborhood": {"kernel_size": 7},
    "clear": {"radius": 4.0},
    "halo": {"block_size": 4, "halo": 2},
    "hilo": {"alpha": 0.5, "window": 2},
    "maxvit_block": {"block_size": 4},
    "maxvit_grid": {"grid_size": 4},
    "agent": {"num_agents": 64},
    "biformer": {"n_win": 4, "topk": 4},
    "sgformer": {"n_win": 4, "num_tokens": 64},
    "linfusion": {},
    "inline": {},
    "rala": {},
}
SCALES = (1, 2, 4)  # grid side multipliers: 1x, 4x, 16x the tokens


def paired_speedup(dense: Callable[[], object], method: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """(dense ms, method ms, speed-up): medians over ``repeats`` rounds that time one call of each back to
    back (after one untimed call of each: setup, caches); the speed-up is the median of the rounds' ratios."""
    def ms(fn):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    dense(), method()
    rounds = [(ms(dense), ms(method)) for _ in range(repeats)]
    return (statistics.median(d for d, _ in rounds), statistics.median(m for _, m in rounds),
            statistics.median(d / m for d, m in rounds))


def configured(name: str, grid: tuple[int, int]) -> dict:
    config = dict(CONFIGS[name])
    if method_class(name).info.spatial:
        config["grid"] = grid
    return config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from attnzoo.trained import digits, vit_digits

    images, labels = digits.load_split("test")
    dense_model, _ = attnzoo.models.load("vit-digits")
    grid, heads = dense_model.grid, dense_model.config.num_heads
    head_dim = dense_model.config.dim // heads
    gen = torch.Generator().manual_seed(0)
    inputs = {s: [torch.randn(1, heads, math.prod(grid) * s * s, head_dim, generator=gen) for _ in range(3)] for s in SCALES}
    dense = {s: (lambda s=s: attnzoo.attention(*inputs[s], "dense", check_finite=False)) for s in SCALES}
    dense_ms: dict[int, list[float]] = {s: [] for s in SCALES}
    rows = [("dense", {}, vit_digits.accuracy(dense_model, images, labels), {s: 1.0 for s in SCALES})]
    for name in a.methods:
        model, _ = vit_digits.load(method=name, **configured(name, grid))
        ratios = {}
        for s in SCALES:
            method = attnzoo.get_method(name, **configured(name, (grid[0] * s, grid[1] * s)))
            method.materialize(heads, heads, head_dim, head_dim)
            dense_once, _, ratios[s] = paired_speedup(dense[s], lambda: method(*inputs[s], check_finite=False), a.repeats)
            dense_ms[s].append(dense_once)
        rows.append((name, CONFIGS[name], vit_digits.accuracy(model, images, labels), ratios))

    tokens = [math.prod(grid) * s * s for s in SCALES]
    print(f"vit-digits test accuracy ({len(labels)} images) training-free, and attention speed-up over dense "
          f"(B=1, {heads} heads x {head_dim}, {a.threads} thread(s), medians of {a.repeats} paired rounds); dense ms: "
          + ", ".join(f"{n} tokens {statistics.median(dense_ms[s]):.2f}" for n, s in zip(tokens, SCALES)))
    if a.markdown:
        print("| method | options | accuracy | " + " | ".join(f"speed-up at {n} tokens" for n in tokens) + " |")
        print("|---|---|---|" + "---|" * len(SCALES))
    for name, config, acc, ratios in rows:
        options = ", ".join(f"{k}={v}" for k, v in config.items()) or "-"
        cells = [f"{ratios[s]:.2f}x" for s in SCALES]
        if a.markdown:
            print(f"| `{name}` | {options} | {acc:.3f} | " + " | ".join(cells) + " |")
        else:
            print(f"{name:13s} {options:28s} accuracy {acc:.3f}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
