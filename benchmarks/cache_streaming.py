"""StreamingLLM at a fixed budget over a long generation: cache bytes and RSS sampled along the way.

    python benchmarks/cache_streaming.py --steps 10000 --budget 1024 --every 250 \\
        --report attnzoo-results/cache_streaming.html --png docs/cache-streaming.png   # the issue's target
    python benchmarks/cache_streaming.py --steps 2000 --budget 1024 --every 100        # a CPU-sized run

SmolLM2-135M, greedy, one token per step with ``interval=1`` (the cache is cut back to the budget
every step), from a ``--prompt``-token prompt of the evaluation text. Every ``--every`` steps it
records (step, cache bytes summed from the cache's tensors, process RSS, decode ms/token since the
last sample) and prints it, and rewrites ``--out`` (JSON), the HTML report
(``attnzoo.bench.report.cache_streaming_report``; its plot needs matplotlib) and, with ``--png``,
the plot: a run stopped early keeps what it reached. The report states the spread of both after
warm-up (the steps until the cache first holds the budget, plus one sample).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import attnzoo
from attnzoo import models
from attnzoo.bench.report import cache_streaming_report, save_plots
from attnzoo.eval.generation import english_ids, prefill, resident_bytes
from attnzoo.integrations.transformers.compress import cache_argument, cache_bytes


def spread(samples: list[dict], key: str) -> float:
    values = [s[key] for s in samples]
    return max(values) - min(values)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="attnzoo-results/cache_streaming.json")
    p.add_argument("--report", default="attnzoo-results/cache_streaming.html")
    p.add_argument("--png", default=None, help="also write the report's plot here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = models.load("smollm2-135m")
    name = cache_argument(model)
    info = {"command": "python benchmarks/cache_streaming.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
            "model": "SmolLM2-135M (float32)", "policy": f"streaming_llm, budget={args.budget}, interval=1",
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "torch threads": torch.get_num_threads(), "load average at start": os.getloadavg()[0]}
    samples = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with attnzoo.compress(model, "streaming_llm", budget=args.budget, interval=1):
        start = prefill(model, english_ids(tokenizer, args.prompt))
        cache, token = start.cache, start.logits.argmax(-1)
        began = time.perf_counter()
        for step in range(1, args.steps + 1):
            token = model(input_ids=token, **{name: cache}, use_cache=True).logits[:, -1:].argmax(-1)
            if step % args.every == 0:
                now = time.perf_counter()
                samples.append({"step": step, "cache_bytes": cache_bytes(cache), "rss_mb": resident_bytes() / 2**20,
                                "decode_ms": 1e3 * (now - began) / args.every, "load": os.getloadavg()[0]})
                print(json.dumps(samples[-1]), flush=True)
                save(samples, info, args)
                began = time.perf_counter()
    print(info.get("after warm-up", "no sample after warm-up"))


def save(samples: list[dict], info: dict, args) -> None:
    """Rewrite the JSON, the HTML report and the plot with the samples so far."""
    info["load average now"] = os.getloadavg()[0]
    warm = [s for s in samples if s["step"] > max(0, args.budget - args.prompt) + args.every]
    if warm:
        info["after warm-up"] = (f"from step {warm[0]['step']} to {warm[-1]['step']}: cache bytes spread {spread(warm, 'cache_bytes')}, "
                                 f"RSS spread {spread(warm, 'rss_mb'):.1f} MB ({min(s['rss_mb'] for s in warm):.1f} to "
                                 f"{max(s['rss_mb'] for s in warm):.1f})")
    Path(args.out).write_text(json.dumps({"info": info, "samples": samples}, indent=1) + "\n")
    page = cache_streaming_report(samples, info)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(page, encoding="utf-8")
    if args.png:
        for path in save_plots(page, Path(args.png).parent):
            path.replace(args.png)


if __name__ == "__main__":
    main()
