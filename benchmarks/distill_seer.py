"""seer on SmolLM2-135M: distil the AttnGate on calibration text, then perplexity at 4K tokens on the
evaluation text against dense, the training-free block selection at the same block budget, and the
untrained gate (its initialisation is mean-pooled q against mean-pooled k, MInference's estimator).

    OMP_NUM_THREADS=1 python benchmarks/distill_seer.py --steps 60 --seq-len 1024 --top-k 12 --out runs/seer
    python benchmarks/distill_seer.py --steps 1500 --seq-len 4096 --stride 2048 --val-every 250 --skip-eval --out runs/seer4k

Calibration text: the docstrings of a fixed list of standard-library modules (English prose about the
library); evaluation text: :func:`attnzoo.eval.english_text` (the language reference), so the gate never
sees the evaluation text. Every method keeps ``--top-k`` key blocks of 64 tokens per query block. The frozen
model runs once per training window (the harness keeps each window's pooled gate inputs and target maps),
so after the first epoch a step costs only the gate's own forward and backward.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import time
from pathlib import Path

import attnzoo
from attnzoo import eval as ev
from attnzoo.distill import distill, text_examples

CALIBRATION_MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses", "datetime",
                       "decimal", "email", "enum", "functools", "heapq", "http.client", "inspect", "itertools", "json",
                       "logging", "multiprocessing", "pathlib", "pickle", "re", "socket", "sqlite3", "subprocess",
                       "tarfile", "threading", "typing", "unittest", "urllib.request", "zipfile")


def calibration_text() -> str:
    """Docstrings of the modules above and of their public classes and functions."""
    parts = []
    for name in CALIBRATION_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            obj = getattr(module, attr)
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)) and inspect.getdoc(obj):
                parts.append(f"{attr}: {inspect.getdoc(obj)}")
    return "\n\n".join(p for p in parts if p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=None, help="training windows start every STRIDE tokens (default: --seq-len)")
    parser.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--val-every", type=int, default=None, help="held-out gate KL every N steps (default: at the end)")
    parser.add_argument("--teacher-cache", default=None, help="keep the teacher's features in this folder (reused by later runs)")
    parser.add_argument("--top-k", type=int, default=12)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--target", choices=("max", "sum"), default="max", help="the gate's training map: tiles max- or sum-pooled")
    parser.add_argument("--skip-eval", action="store_true", help="train only (distill_seer_bound.py measures the checkpoint)")
    parser.add_argument("--out", default="runs/seer")
    args = parser.parse_args()
    model, tokenizer = attnzoo.models.load("smollm2-135m")
    train, val = text_examples(tokenizer, calibration_text(), args.seq_len, stride=args.stride)
    start = time.perf_counter()
    run = distill(model, "seer", train, args.out, steps=args.steps, val=val[:2], block_size=args.block_size, top_k=args.top_k,
                  target=args.target, lr=args.lr, val_every=args.val_every, cache_teacher=args.teacher_cache)
    minutes = (time.perf_counter() - start) / 60
    budget = dict(block_size=args.block_size, top_k=args.top_k)
    tokens = args.steps * args.seq_len
    distinct = len(train) * args.seq_len if args.stride is None else (len(train) - 1) * args.stride + args.seq_len
    print(f"training: {args.steps} steps of {args.seq_len} tokens ({len(train)} windows over {distinct} distinct tokens), "
          f"{minutes:.1f} min", flush=True)
    result = {"context": args.context, **budget, "target": args.target, "steps": args.steps, "seq_len": args.seq_len,
              "stride": args.stride, "windows": len(train), "distinct_tokens": distinct, "train_tokens": tokens,
              "train_minutes": round(minutes, 2), "last": run.metrics[-1] if run.metrics else None}
    if args.skip_eval:
        (Path(args.out) / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        return
    rows = {}

    def ppl(name, method=None, **config):
        if method is None:
            rows[name] = ev.perplexity(model, tokenizer, context_len=args.context).perplexity
        else:
            with attnzoo.patch(model, method, **config):
                rows[name] = ev.perplexity(model, tokenizer, context_len=args.context).perplexity
        print(f"{name:40s} {rows[name]:.3f}", flush=True)

    ppl("dense")
    ppl("seer (distilled)", "seer", weights=args.out)
    ppl("seer (untrained gate)", "seer", **budget)
    ppl("block_sparse sampled_q", "block_sparse", estimator="sampled_q", **budget)
    ppl("block_sparse pooled_qk", "block_sparse", **budget)
    (Path(args.out) / "result.json").write_text(json.dumps({**result, "perplexity": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
