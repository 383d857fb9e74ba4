"""KV-cache policies on SmolLM2-135M in real generation, against the dense cache in the same run.

    python benchmarks/cache_table.py                        # the issue's full table (hours on a CPU)
    python benchmarks/cache_table.py --cost-context 2048 --passkey-contexts 1024 --trials 2 \\
        --ppl-context 1024 --continuation 256 --ratios 0.25 --policies snapkv,streaming_llm,h2o

Per policy and ratio: the KV bytes the cache holds at the end (summed from its tensors), the peak
RSS above the start, prefill seconds and decode milliseconds per token at ``--cost-context``
(each also as a ratio to the dense run of the same process: wall-clock timings on a shared
machine are only comparable within one run), passkey accuracy at each of ``--passkey-contexts``
(``--trials`` keys spread over the depths), and the perplexity of a ``--continuation``-token
continuation teacher-forced after a compressed ``--ppl-context``. Writes JSON (``--out``) and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import attnzoo
from attnzoo import models
from attnzoo.eval.generation import (
    continuation_perplexity,
    english_ids,
    generation_cost,
)
from attnzoo.eval.passkey import passkey


def measure(model, tokenizer, args) -> dict:
    cost = generation_cost(model, english_ids(tokenizer, args.cost_context), args.new)
    row = {"cost": cost.as_dict(), "passkey": {}}
    depths = [(i + 0.5) / args.trials for i in range(args.trials)]
    for context in args.passkey_contexts:
        result = passkey(model, tokenizer, context, depths, 1, show_progress=False)
        row["passkey"][context] = f"{result.correct}/{len(result.trials)}"
    ids = english_ids(tokenizer, args.ppl_context + args.continuation)
    row["ppl"] = continuation_perplexity(model, ids, args.ppl_context, args.continuation).perplexity
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policies", default="snapkv,streaming_llm,h2o")
    p.add_argument("--ratios", default="0.5,0.25,0.125")
    p.add_argument("--cost-context", type=int, default=7168)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--passkey-contexts", default="4096,7168")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--ppl-context", type=int, default=4096)
    p.add_argument("--continuation", type=int, default=512)
    p.add_argument("--chunk", type=int, default=None, help="chunked prefill for every policy")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="attnzoo-results/cache_table.json")
    args = p.parse_args()
    args.passkey_contexts = [int(x) for x in args.passkey_contexts.split(",") if x]
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = models.load("smollm2-135m")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = {"dense": measure(model, tokenizer, args)}
    for name in args.policies.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            with attnzoo.compress(model, name, ratio=ratio, chunk=args.chunk):
                rows[f"{name} {ratio}"] = measure(model, tokenizer, args)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"args": vars(args), "started": started, "rows": rows}, indent=2) + "\n")
    dense = rows["dense"]["cost"]
    contexts = " | ".join(f"passkey {c}" for c in args.passkey_contexts)
    print(f"| cache | KV MB | vs dense | peak RSS MB | prefill s (x dense) | decode ms/token (x dense) | {contexts} | ppl |")
    print("|" + "---|" * (7 + len(args.passkey_contexts)))
    for name, row in rows.items():
        c = row["cost"]
        keys = " | ".join(row["passkey"][k] for k in args.passkey_contexts)
        print(f"| {name} | {c['final_cache_bytes'] / 2**20:.1f} | {dense['final_cache_bytes'] / c['final_cache_bytes']:.2f}x smaller | "
              f"{c['peak_rss_bytes'] / 2**20:.0f} | {c['prefill_s']:.1f} ({c['prefill_s'] / dense['prefill_s']:.2f}) | "
              f"{c['decode_ms']:.1f} ({c['decode_ms'] / dense['decode_ms']:.2f}) | {keys} | {row['ppl']:.2f} |")


if __name__ == "__main__":
    main()
