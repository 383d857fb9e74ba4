"""Decode speed under a KV-cache policy against the dense cache, steps interleaved (SmolLM2-135M).

    python benchmarks/cache_decode.py --context 7168 --policy snapkv --ratio 0.25 --steps 32

Prefills the evaluation text's first ``--context`` tokens twice (a dense cache, and one under
``attnzoo.compress``), then alternates one dense decode step and one compressed decode step, so
both see the same machine load; prints the median milliseconds of each and their ratio, and the
bytes each cache holds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import attnzoo
from attnzoo import models
from attnzoo.eval.generation import english_ids
from attnzoo.integrations.transformers.compress import cache_argument, cache_bytes


def _cache(out):
    return getattr(out, "cache", None) or out.past_key_values


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=7168)
    p.add_argument("--policy", default="snapkv")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args()
    model, tokenizer = models.load("smollm2-135m")
    name, ids = cache_argument(model), english_ids(tokenizer, args.context)
    dense = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    with attnzoo.compress(model, args.policy, ratio=args.ratio):
        small = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    caches = {"dense": _cache(dense), args.policy: _cache(small)}
    tokens = {"dense": dense.logits[:, -1:].argmax(-1), args.policy: small.logits[:, -1:].argmax(-1)}
    times = {key: [] for key in caches}
    for _ in range(args.steps):
        for key, cache in caches.items():
            handle = attnzoo.compress(model, args.policy, ratio=args.ratio) if key != "dense" else None
            start = time.perf_counter()
            out = model(input_ids=tokens[key], **{name: cache}, use_cache=True)
            times[key].append(time.perf_counter() - start)
            tokens[key] = out.logits[:, -1:].argmax(-1)
            if handle is not None:
                handle.close()
    ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
    print(json.dumps({"context": args.context, "policy": args.policy, "ratio": args.ratio, "steps": args.steps, "decode_ms": ms,
                      "speedup": ms["dense"] / ms[args.policy], "cache_bytes": {k: cache_bytes(c) for k, c in caches.items()}}))


if __name__ == "__main__":
    main()
