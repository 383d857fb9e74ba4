"""attnzoo.compress against NVIDIA's kvpress, side by side: SnapKV and StreamingLLM on the same prompts.

kvpress pins transformers < 5.3, so run this where kvpress imports (attnzoo supports 5.2), e.g.

    pip install --target /tmp/kvenv kvpress "transformers<5.3"
    PYTHONPATH=/tmp/kvenv:src python benchmarks/vs_kvpress.py --contexts 1024,2048 --trials 2

For each policy, context and passkey prompt (SmolLM2-135M, keep ratio ``--keep``): the token
indices each cache keeps per layer and key / value head (recovered by matching the kept key
vectors against a dense prefill's, so both libraries are read the same way), their overlap
(|attnzoo ∩ kvpress| / |kvpress|), whether the greedy answers are the same and both right, and
prefill seconds and the cache's bytes of each. attnzoo's SnapKV is configured as kvpress's
(window 64, kernel 5, average pooling). Decoding compresses nothing further in either.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import attnzoo
from attnzoo import models
from attnzoo.eval.generation import PeakMemory
from attnzoo.eval.passkey import passkey_prompt
from attnzoo.integrations.transformers.compress import cache_argument, cache_bytes


def kept_indices(kept: list[torch.Tensor], dense: list[torch.Tensor]) -> list[list[set[int]]]:
    """[layer][kv head] -> indices of the dense prefill's keys (per layer (1, Hkv, N, D)) that
    the ``kept`` keys (per layer (1, Hkv, S, D), right after prefill) are."""
    out = []
    for layer, full in zip(kept, dense):
        heads = []
        for h in range(full.shape[1]):
            distance = torch.cdist(layer[0, h].double(), full[0, h].double(), compute_mode="donot_use_mm_for_euclid_dist")
            heads.append(set(distance.argmin(dim=1).tolist()))
        out.append(heads)
    return out


@torch.no_grad()
def prefill_and_answer(model, tokenizer, ids, context_manager, new_tokens: int = 8):
    """(the keys each layer holds after prefill, prefill seconds, peak RSS above start, the cache's
    bytes after prefill, answer text) with ``context_manager`` around the prefill only."""
    name = cache_argument(model)
    cache = DynamicCache(config=model.config)
    with PeakMemory() as peak, context_manager:
        start = time.perf_counter()
        out = model(input_ids=ids, **{name: cache}, use_cache=True, logits_to_keep=1)
        seconds = time.perf_counter() - start
    token, answer = out.logits[:, -1:].argmax(-1), []
    held, kept = cache_bytes(cache), [layer.keys.clone() for layer in cache.layers]
    for _ in range(new_tokens):  # decode outside the compression: neither library compresses it further
        answer.append(int(token))
        out = model(input_ids=token, **{name: cache}, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return kept, seconds, peak.above, held, tokenizer.decode(answer, skip_special_tokens=True)


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def main() -> None:
    from kvpress import SnapKVPress, StreamingLLMPress

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="1024,2048")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--keep", type=float, default=0.25, help="fraction of the prompt kept")
    p.add_argument("--out", default="attnzoo-results/vs_kvpress.json")
    args = p.parse_args()
    from importlib.metadata import version

    model, tokenizer = models.load("smollm2-135m")
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        for trial in range(args.trials):
            key = str(10000 + 7919 * (trial + 1) % 90000)
            ids, _ = passkey_prompt(tokenizer, context, (trial + 0.5) / args.trials, key)
            budget = int(ids.shape[1] * args.keep)  # kvpress keeps int(n * (1 - compression_ratio))
            dense, dense_s, dense_rss, dense_bytes, dense_answer = prefill_and_answer(model, tokenizer, ids, _Nothing())
            pairs = {
                "snapkv": (SnapKVPress(compression_ratio=1 - args.keep, window_size=64, kernel_size=5),
                           lambda budget=budget: attnzoo.compress(model, "snapkv", budget=budget, window=64, kernel=5, pooling="avg")),
                "streaming_llm": (StreamingLLMPress(compression_ratio=1 - args.keep, n_sink=4),
                                  lambda budget=budget: attnzoo.compress(model, "streaming_llm", budget=budget, sinks=4)),
            }
            for name, (press, ours) in pairs.items():
                theirs = prefill_and_answer(model, tokenizer, ids, press(model))
                mine = prefill_and_answer(model, tokenizer, ids, ours())
                a, b = kept_indices(mine[0], dense), kept_indices(theirs[0], dense)
                overlap = sum(len(x & y) for la, lb in zip(a, b) for x, y in zip(la, lb)) / sum(len(y) for lb in b for y in lb)
                right = lambda text, key=key: bool(re.search(r"\d+", text)) and re.search(r"\d+", text).group() == key
                rows.append({"policy": name, "context": ids.shape[1], "trial": trial, "overlap": overlap,
                             "same_answer": mine[4].strip() == theirs[4].strip(), "attnzoo_right": right(mine[4]), "kvpress_right": right(theirs[4]),
                             "dense_right": right(dense_answer), "attnzoo_prefill_s": mine[1], "kvpress_prefill_s": theirs[1], "dense_prefill_s": dense_s,
                             "attnzoo_bytes": mine[3], "kvpress_bytes": theirs[3], "dense_bytes": dense_bytes,
                             "attnzoo_peak_rss": mine[2], "kvpress_peak_rss": theirs[2], "dense_peak_rss": dense_rss})
                print(json.dumps(rows[-1]))
    env = {"kvpress": version("kvpress"), "transformers": version("transformers"),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    print("| policy | context | kept-index overlap | same answer | attnzoo / kvpress / dense right | prefill s attnzoo / kvpress / dense | "
          "cache MB attnzoo / kvpress / dense |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['context']} | {r['overlap']:.3f} | {'yes' if r['same_answer'] else 'no'} | "
              f"{int(r['attnzoo_right'])} / {int(r['kvpress_right'])} / {int(r['dense_right'])} | "
              f"{r['attnzoo_prefill_s']:.2f} / {r['kvpress_prefill_s']:.2f} / {r['dense_prefill_s']:.2f} | "
              f"{r['attnzoo_bytes'] / 2**20:.1f} / {r['kvpress_bytes'] / 2**20:.1f} / {r['dense_bytes'] / 2**20:.1f} |")
    print(json.dumps(env))


if __name__ == "__main__":
    main()
