"""StreamingLLM at a fixed budget over a long generation: cache bytes and RSS sampled along the way.

    python benchmarks/cache_streaming.py --steps 10000 --budget 1024 --every 250   # the issue's target
    python benchmarks/cache_streaming.py --steps 2000 --budget 1024 --every 100    # a CPU-sized run

SmolLM2-135M, greedy, one token per step with ``interval=1`` (the cache is cut back to the budget
every step), from a 512-token prompt of the evaluation text. Prints (step, cache bytes, RSS MB,
decode ms/token over the last samples) every ``--every`` steps; with matplotlib, ``--plot PATH``
draws both curves.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import attnzoo
from attnzoo import models
from attnzoo.eval.generation import english_ids, resident_bytes
from attnzoo.integrations.transformers.compress import cache_argument, cache_bytes


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    model, tokenizer = models.load("smollm2-135m")
    name = cache_argument(model)
    samples = []
    with attnzoo.compress(model, "streaming_llm", budget=args.budget, interval=1):
        out = model(input_ids=english_ids(tokenizer, 512), use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            out = model(input_ids=token, **{name: cache}, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            if step % args.every == 0:
                now = time.perf_counter()
                samples.append({"step": step, "cache_bytes": cache_bytes(cache), "rss_mb": resident_bytes() / 2**20,
                                "decode_ms": 1e3 * (now - start) / args.every})
                start = now
                print(json.dumps(samples[-1]), flush=True)
    if args.plot:
        import matplotlib.pyplot as plt

        fig, left = plt.subplots()
        left.plot([s["step"] for s in samples], [s["cache_bytes"] / 2**20 for s in samples], label="cache MB")
        left.plot([s["step"] for s in samples], [s["rss_mb"] for s in samples], label="RSS MB")
        left.set_xlabel("generated tokens")
        left.legend()
        fig.savefig(args.plot)


if __name__ == "__main__":
    main()
