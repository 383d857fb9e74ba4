"""Chunked prefill under a KV budget: peak memory of a long prompt's prefill, chunked or not, on SmolLM2-135M.

    python benchmarks/cache_chunked.py --tokens 16384 --budget 1024 --chunk 1024   # the issue's target
    python benchmarks/cache_chunked.py --tokens 4096 --budget 512 --chunk 512      # a CPU-sized run

Each run is a fresh process (peak resident memory is per process), prefilling the evaluation
text's first ``--tokens`` tokens: ``dense`` (no compression), ``snapkv`` (compressed after the
prompt's attention) and ``snapkv chunked``; prints the peak RSS above the loaded model and the KV
bytes held after prefill, and the chunked peak as a fraction of the unchunked one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def one(mode: str, tokens: int, budget: int, chunk: int) -> dict:
    import torch

    import attnzoo
    from attnzoo import models
    from attnzoo.eval.generation import PeakMemory, english_ids
    from attnzoo.integrations.transformers.compress import cache_bytes

    model, tokenizer = models.load("smollm2-135m")
    ids = english_ids(tokenizer, tokens)
    settings = {"dense": None, "snapkv": {}, "snapkv chunked": {"chunk": chunk}}[mode]
    handle = attnzoo.compress(model, "snapkv", budget=budget, **settings) if settings is not None else None
    with torch.no_grad(), PeakMemory() as peak:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    held = cache_bytes(getattr(out, "cache", None) or out.past_key_values)
    if handle is not None:
        handle.close()
    return {"mode": mode, "tokens": tokens, "peak_rss_bytes": peak.above, "cache_bytes": held}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.tokens, args.budget, args.chunk)))
        return
    rows = []
    for mode in ("dense", "snapkv", "snapkv chunked"):
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--tokens", str(args.tokens), "--budget", str(args.budget),
                              "--chunk", str(args.chunk)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    unchunked, chunked = rows[1]["peak_rss_bytes"], rows[2]["peak_rss_bytes"]
    print(f"chunked / unchunked peak RSS: {chunked / unchunked:.3f}")


if __name__ == "__main__":
    main()
