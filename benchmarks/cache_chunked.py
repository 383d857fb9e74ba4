"""Chunked prefill under a KV budget: peak memory of a long prompt's prefill, chunked or not, on SmolLM2-135M.

    python benchmarks/cache_chunked.py --tokens 16384 --budget 1024 --chunk 1024   # the issue's target
    python benchmarks/cache_chunked.py --tokens 4096 --budget 512 --chunk 512      # a CPU-sized run

Each run is a fresh process (peak resident memory is per process), prefilling the evaluation
text's first ``--tokens`` tokens: ``dense`` (no compression), ``snapkv`` (compressed after the
prompt's attention) and ``snapkv chunked``; prints the peak RSS above the loaded model and the KV
bytes held after prefill, the prefill's seconds and the load average, and the chunked peak as a
fraction of the unchunked one. Each mode's row is added to ``--out`` (JSON) as it finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def one(mode: str, tokens: int, budget: int, chunk: int, threads: int | None) -> dict:
    import torch

    import attnzoo
    from attnzoo import models
    from attnzoo.eval.generation import PeakMemory, english_ids
    from attnzoo.integrations.transformers.compress import cache_bytes

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = models.load("smollm2-135m")
    ids = english_ids(tokenizer, tokens)
    settings = {"dense": None, "snapkv": {}, "snapkv chunked": {"chunk": chunk}}[mode]
    handle = attnzoo.compress(model, "snapkv", budget=budget, **settings) if settings is not None else None
    began, load = time.perf_counter(), os.getloadavg()[0]
    with torch.no_grad(), PeakMemory() as peak:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - began
    held = cache_bytes(getattr(out, "cache", None) or out.past_key_values)
    if handle is not None:
        handle.close()
    return {"mode": mode, "tokens": tokens, "budget": budget, "chunk": chunk, "peak_rss_bytes": peak.above, "cache_bytes": held,
            "prefill_s": seconds, "load_before": load, "load_after": os.getloadavg()[0], "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--modes", default="snapkv chunked,snapkv,dense", help="comma-separated, each in its own process")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="attnzoo-results/cache_chunked.json")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.tokens, args.budget, args.chunk, args.threads)))
        return
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    for mode in args.modes.split(","):
        command = [sys.executable, __file__, "--one", mode, "--tokens", str(args.tokens), "--budget", str(args.budget),
                   "--chunk", str(args.chunk)] + (["--threads", str(args.threads)] if args.threads else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(json.dumps(rows[-1]), flush=True)
    peaks = {row["mode"]: row["peak_rss_bytes"] for row in rows if row["tokens"] == args.tokens}
    if "snapkv" in peaks and "snapkv chunked" in peaks:
        print(f"chunked / unchunked peak RSS: {peaks['snapkv chunked'] / peaks['snapkv']:.3f}")


if __name__ == "__main__":
    main()
