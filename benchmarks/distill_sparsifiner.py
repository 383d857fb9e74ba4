"""Sparsifiner on vit-digits: test accuracy of dense attention, of the untrained predictor and of the
distilled one at the same connectivity, and of the exact top-k (the oracle the predictor imitates).

    OMP_NUM_THREADS=1 python benchmarks/distill_sparsifiner.py --steps 150 --density 0.25 --out runs/sparsifiner

Distils every layer's predictor on the digits train split (held-out: the val split), then evaluates on
the test split. Prints one table and writes it as JSON beside the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import attnzoo
from attnzoo.distill import distill
from attnzoo.trained import digits, vit_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="runs/sparsifiner")
    args = parser.parse_args()
    model, _ = attnzoo.models.load("vit-digits")
    train, val = digits.load_split("train")[0], digits.load_split("val")[0]
    test_images, test_labels = digits.load_split("test")
    start = time.perf_counter()
    run = distill(model, "sparsifiner", train, args.out, steps=args.steps, val=val[:32], batch_size=args.batch_size,
                  density=args.density, rank=args.rank)
    minutes = (time.perf_counter() - start) / 60
    rows = {"dense": vit_digits.accuracy(model, test_images, test_labels)}
    with attnzoo.patch(model, "sparsifiner", density=args.density, rank=args.rank):
        rows["untrained predictor"] = vit_digits.accuracy(model, test_images, test_labels)
    with attnzoo.patch(model, "sparsifiner", weights=args.out):
        rows["distilled predictor"] = vit_digits.accuracy(model, test_images, test_labels)
    with attnzoo.patch(model, "sparsifiner", density=args.density, rank=model.blocks[0].attn.head_dim):
        rows["exact top-k (oracle)"] = vit_digits.accuracy(model, test_images, test_labels)
    tokens = args.steps * args.batch_size * model.grid[0] * model.grid[1]
    result = {"density": args.density, "rank": args.rank, "steps": args.steps, "batch_size": args.batch_size,
              "train_minutes": round(minutes, 2), "train_tokens": tokens, "accuracy": rows, "last": run.metrics[-1]}
    for name, acc in rows.items():
        print(f"{name:24s} {acc:.4f}")
    print(f"training: {args.steps} steps, {tokens} tokens, {minutes:.1f} min (CPU, under load)")
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
