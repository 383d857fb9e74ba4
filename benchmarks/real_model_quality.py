"""Quality of local attention methods on SmolLM2-135M-Instruct, on CPU, offline.

For ``dense``, each local method that runs causal attention (sliding_window, streaming, s2,
moa; configs below, each sparse at 4K) and the dynamic methods hip, block_sparse and
vertical_slash with their defaults (``attnzoo.patch(model, "hip")``, no options): perplexity at 4096 tokens on the Python language reference
(``attnzoo.eval.english_text``) and passkey accuracy at 4096 tokens (depths 0.1, 0.5, 0.9) and 7168
tokens (depths 0.1, 0.9; one random key per depth, greedy decode; decode steps run the method's own
pattern over the cache). Also checks that the model patched with ``dense`` matches the unpatched
model (relative logit difference).

    python benchmarks/real_model_quality.py [--out attnzoo-results/real_model_quality.json]

Every figure is written to the JSON file as soon as it is measured; a rerun skips what the file
already holds, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import attnzoo
from attnzoo.eval import english_text, passkey, perplexity
from attnzoo.eval.common import save_json
from attnzoo.eval.perplexity import token_ids

METHODS: dict[str, dict] = {
    "dense": {},
    "sliding_window": {"window": 1024},
    "streaming": {"sinks": 4, "window": 1024},
    "s2": {"block_size": 64, "local_blocks": 16, "vert_stride": 8},
    "moa": {"spans": [512, 1024, 2048] * 3, "sinks": 64},
    # the dynamic methods with no options: their budgets follow methods/dynamic/budget.py
    "hip": {},
    "block_sparse": {},
    "vertical_slash": {},
}
TASKS = [("ppl", 4096, ()), ("passkey", 4096, (0.1, 0.5, 0.9)), ("passkey", 7168, (0.1, 0.9))]


@torch.no_grad()
def dense_matches_unpatched(model, tokenizer, tokens: int = 1024) -> dict:
    ids = token_ids(tokenizer, english_text())[:tokens][None]
    reference = model(input_ids=ids).logits.double()
    with attnzoo.patch(model, "dense"):
        patched = model(input_ids=ids).logits.double()
    rel = float((patched - reference).norm() / reference.norm())
    worst = float(((patched - reference).norm(dim=-1) / reference.norm(dim=-1)).max())
    return {"tokens": tokens, "rel_diff": rel, "max_row_rel_diff": worst, "within_1e-4": worst <= 1e-4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="attnzoo-results/real_model_quality.json")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    args = parser.parse_args()
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"model": "smollm2-135m", "results": {}}
    data.update(configs=METHODS, tasks=TASKS, torch_threads=torch.get_num_threads(), decode="method (decode='auto')",
                text="attnzoo.eval.english_text(): pydoc_data.topics, the Python language reference")
    model, tokenizer = attnzoo.models.load("smollm2-135m")
    if "dense_vs_unpatched" not in data:
        data["dense_vs_unpatched"] = dense_matches_unpatched(model, tokenizer)
        save_json(out, data)
    print("dense vs unpatched:", data["dense_vs_unpatched"], flush=True)
    for task, context, depths in TASKS:
        for name in args.methods.split(","):
            key = f"{name}/{task}/{context}"
            if key in data["results"] and not data["results"][key].get("partial"):
                continue
            start = time.perf_counter()

            def save_partial(result, key=key):
                data["results"][key] = {**result.as_dict(), "partial": True}
                save_json(out, data)

            with attnzoo.patch(model, name, **METHODS[name]):
                if task == "ppl":
                    row = perplexity(model, tokenizer, context_len=context).as_dict()
                else:
                    row = passkey(model, tokenizer, context, depths, 1, on_trial=save_partial).as_dict()
            row["seconds"] = round(time.perf_counter() - start, 1)
            data["results"][key] = row
            save_json(out, data)
            summary = f"ppl {row['perplexity']:.3f}" if task == "ppl" else f"passkey {row['correct']}/{len(row['trials'])}"
            print(f"{key:32s} {summary}  ({row['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
