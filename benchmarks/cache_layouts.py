"""Cache layouts against the dense cache: the uniform compressed layer, the ragged one at equal budgets, DiffQKV.

    OMP_NUM_THREADS=1 python benchmarks/cache_layouts.py --model tiny --context 2048 --budget 512 --steps 24
    OMP_NUM_THREADS=1 python benchmarks/cache_layouts.py --model smollm2-135m --variants diffqkv diffqkv-top \\
        --context 2048 --ppl-context 1024 --continuation 256

Prefills ``--context`` tokens once per variant, then decodes interleaved (one step of every
variant per round, so all see the same machine load) and prints median ms/token, its ratio to the
dense cache, and the bytes each cache holds after the prefill; ``--ppl-context``: also the
perplexity of a ``--continuation``-token continuation teacher-forced after that context. Variants:
``uniform`` (snapkv at ``--budget``, the (B, Hkv, S, D) layer), ``ragged`` (the same with
``ragged=True``: per-head tensors, the layer attending itself), ``diffqkv`` (``--k-heads`` merged K
heads per layer, every V head), ``diffqkv-top`` (also V read for the ``--v-top`` best keys only),
``v-top-only`` (no K merged, V read for the ``--v-top`` best keys). ``--model tiny``:
a random-init llama (9 heads, 3 KV heads like SmolLM2's, 4 layers) on random tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import attnzoo
from attnzoo.eval.common import save_json
from attnzoo.eval.generation import continuation_perplexity, english_ids
from attnzoo.integrations.transformers.compress import cache_argument, cache_bytes


def variants(args, kv_heads: int) -> dict[str, dict | None]:
    known = {"dense": None, "uniform": {"policy": "snapkv", "budget": args.budget},
             "ragged": {"policy": "snapkv", "budget": args.budget, "ragged": True},
             "diffqkv": {"policy": "diffqkv", "k_heads": args.k_heads},
             "diffqkv-top": {"policy": "diffqkv", "k_heads": args.k_heads, "v_top": args.v_top},
             "v-top-only": {"policy": "diffqkv", "k_heads": kv_heads, "v_top": args.v_top}}
    return {name: known[name] for name in ["dense", *args.variants]}


def load(name: str):
    if name != "tiny":
        return attnzoo.models.load(name)
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=288, intermediate_size=768, num_hidden_layers=4, num_attention_heads=9,
                                      num_key_value_heads=3, max_position_embeddings=8192)
    return transformers.LlamaForCausalLM(config).eval(), None


def compression(model, setting: dict | None):
    return None if setting is None else attnzoo.compress(model, **setting)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--variants", nargs="+", default=["uniform", "ragged"], choices=["uniform", "ragged", "diffqkv", "diffqkv-top", "v-top-only"])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--v-top", type=int, default=256)
    p.add_argument("--k-heads", type=int, default=1)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--ppl-context", type=int, default=0)
    p.add_argument("--continuation", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    total = max(args.context, args.ppl_context + args.continuation)
    ids = torch.randint(0, 1000, (1, total), generator=torch.Generator().manual_seed(0)) if tokenizer is None else english_ids(tokenizer, total)
    name, settings = cache_argument(model), variants(args, model.config.num_key_value_heads)
    caches, tokens, held = {}, {}, {}
    for key, setting in settings.items():
        handle = compression(model, setting)
        out = model(input_ids=ids[:, :args.context], use_cache=True, logits_to_keep=1)
        caches[key], tokens[key] = getattr(out, "cache", None) or out.past_key_values, out.logits[:, -1:].argmax(-1)
        held[key] = cache_bytes(caches[key])
        if handle is not None:
            handle.close()
    times = {key: [] for key in settings}
    for _ in range(args.steps):
        for key, setting in settings.items():
            handle = compression(model, setting)
            start = time.perf_counter()
            out = model(input_ids=tokens[key], **{name: caches[key]}, use_cache=True)
            times[key].append(time.perf_counter() - start)
            tokens[key] = out.logits[:, -1:].argmax(-1)
            if handle is not None:
                handle.close()
    ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
    result = {"model": args.model, "context": args.context, "steps": args.steps, "threads": args.threads, "settings": settings,
              "decode_ms": ms, "vs_dense": {k: ms[k] / ms["dense"] for k in ms}, "cache_bytes": held,
              "bytes_vs_dense": {k: held[k] / held["dense"] for k in held}}
    if "uniform" in ms and "ragged" in ms:
        result["ragged_vs_uniform"] = ms["ragged"] / ms["uniform"]
    if args.ppl_context:
        result["ppl"] = {}
        for key, setting in settings.items():
            handle = compression(model, setting)
            result["ppl"][key] = continuation_perplexity(model, ids, args.ppl_context, args.continuation).perplexity
            if handle is not None:
                handle.close()
    if args.out:
        save_json(args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
