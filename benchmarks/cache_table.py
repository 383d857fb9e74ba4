"""KV-cache policies on SmolLM2-135M in real generation, against the dense cache in the same run.

    python benchmarks/cache_table.py                  # the issue's full table (every registered policy)
    python benchmarks/cache_table.py --policies snapkv,streaming_llm --cost-context 2048 \\
        --passkey-contexts 1024 --trials 2 --ppl-context 1024 --continuation 256    # a quick one
    python benchmarks/cache_table.py --report         # the Markdown table of what --out holds so far

Every result is written to ``--out`` as it comes, and a rerun skips what the file already holds
(so a rerun with more ``--policies`` adds their rows). Per policy and ratio:

- cost at ``--cost-context`` tokens: the prefill's seconds and its peak RSS above the start
  (sampled, in this process: the allocator reuses earlier runs' memory, so it understates), the
  KV bytes held (summed from the cache's tensors) and the decode milliseconds per token, dense and
  compressed steps interleaved (``--new`` each) so both see the same load;
- ``ppl``: perplexity of a ``--continuation``-token continuation teacher-forced after a
  compressed ``--ppl-context``;
- passkey at each of ``--passkey-contexts``, ``--trials`` keys spread over the depths.

One prefill, several budgets: the policies in ``ONE_PREFILL`` score keys without reference to
the budget, so each prompt is prefilled once per policy keeping every key
(:func:`attnzoo.eval.generation.keep_all`) and cut to each ratio (:func:`~attnzoo.eval.generation.cut`);
those in ``SHARED_PREFIX`` read only the latest queries, so they and the dense row share one
dense prefill of all but the prompt's last ``--tail`` tokens. ``tests/cache/test_one_prefill.py``
checks both against separate runs. Other policies (added later) get a separate prefill per ratio.
The cost section's prefill is a full one per policy (no shared prefix): its time is the
keep-everything prefill's (the policy's scoring included), plus the cut's, listed apart.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

import attnzoo
from attnzoo.cache import list_policies
from attnzoo.eval.generation import (
    PeakMemory,
    continuation_nll,
    cut,
    english_ids,
    greedy,
    keep_all,
    prefill,
)
from attnzoo.eval.passkey import answer_is, passkey_plan, passkey_prompt
from attnzoo.integrations.transformers.compress import cache_argument, cache_bytes

SHARED_PREFIX = {"snapkv", "streaming_llm"}  # read only the latest queries (not cumulative)
ONE_PREFILL = SHARED_PREFIX | {"h2o", "selective"}  # every score independent of the budget


class Results:
    """The JSON file of results, keyed by strings such as ``passkey|7168|3|snapkv|0.25``; saved on every put."""

    def __init__(self, path: str, header: dict):
        self.path = Path(path)
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data = {**header, "runs": old.get("runs", []) + [header["run"]], "results": old.get("results", {})}
        del self.data["run"]

    def has(self, *keys: str) -> bool:
        return all(k in self.data["results"] for k in keys)

    def put(self, key: str, value) -> None:
        self.data["results"][key] = value
        self.data["runs"][-1]["load_now"] = os.getloadavg()[0]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=1) + "\n")
        temporary.replace(self.path)


def starts(model, name: str, ids: torch.Tensor, ratios, prefix):
    """(ratio, prefilled cache of ``ids`` under policy ``name`` at that ratio) for each ratio;
    decode each inside ``attnzoo.compress(model, name, ratio=ratio)``. ``prefix``: the dense
    prefill of ``ids`` but its tail, shared by the :data:`SHARED_PREFIX` policies."""
    if name in ONE_PREFILL:
        full = keep_all(model, name, ids, dense_prefix=prefix if name in SHARED_PREFIX else None)
        for ratio in ratios:
            yield ratio, cut(model, name, full, ratio)
        return
    for ratio in ratios:
        with attnzoo.compress(model, name, ratio=ratio):
            start = prefill(model, ids)
        yield ratio, start


def dense_start(model, ids, prefix):
    """The dense prefill of ``ids`` continued from a copy of ``prefix`` (its first tokens)."""
    return prefill(model, ids[:, prefix.cache.get_seq_length():], copy.deepcopy(prefix.cache))


@torch.no_grad()
def interleaved_decode(model, runs: dict, steps: int) -> dict[str, float]:
    """Median ms per decode step of each run {label: (policy name or None, ratio, Prefill)}, one
    step of each in turn (the same load for all)."""
    name, times = cache_argument(model), {label: [] for label in runs}
    tokens = {label: start.logits[:, -1:].argmax(-1) for label, (_, _, start) in runs.items()}
    for _ in range(steps):
        for label, (policy, ratio, start) in runs.items():
            handle = attnzoo.compress(model, policy, ratio=ratio) if policy is not None else None
            began = time.perf_counter()
            out = model(input_ids=tokens[label], **{name: start.cache}, use_cache=True)
            times[label].append(time.perf_counter() - began)
            tokens[label] = out.logits[:, -1:].argmax(-1)
            if handle is not None:
                handle.close()
    return {label: 1e3 * statistics.median(t) for label, t in times.items()}


def timed(function, *args, **kwargs):
    with PeakMemory() as peak:
        began = time.perf_counter()
        out = function(*args, **kwargs)
        seconds = time.perf_counter() - began
    return out, seconds, peak.above


def cost_section(model, tokenizer, args, results: Results) -> None:
    if results.has("cost|dense", *(f"cost|{name}|{r}" for name in args.policies for r in args.ratios)):
        return
    ids = english_ids(tokenizer, args.cost_context)
    dense, seconds, peak = timed(prefill, model, ids)
    if not results.has("cost|dense"):
        results.put("cost|dense", {"prefill_s": seconds, "peak_rss_bytes": peak, "cache_bytes": cache_bytes(dense.cache)})
    for name in args.policies:
        keys = [f"cost|{name}|{r}" for r in args.ratios]
        if results.has(*keys):
            continue
        rows, runs = {}, {"dense": (None, None, dense.copy())}
        if name in ONE_PREFILL:
            full, seconds, peak = timed(keep_all, model, name, ids)
            for ratio in args.ratios:
                start, cut_s, _ = timed(cut, model, name, full, ratio)
                rows[ratio] = {"prefill_s": seconds, "cut_s": cut_s, "peak_rss_bytes": peak, "prefill": "keep-all + cut"}
                runs[ratio] = (name, ratio, start)
            del full
        else:
            for ratio in args.ratios:
                with attnzoo.compress(model, name, ratio=ratio):
                    start, seconds, peak = timed(prefill, model, ids)
                rows[ratio] = {"prefill_s": seconds, "peak_rss_bytes": peak, "prefill": "separate"}
                runs[ratio] = (name, ratio, start)
        for ratio in args.ratios:
            rows[ratio]["cache_bytes"] = cache_bytes(runs[ratio][2].cache)
        ms = interleaved_decode(model, runs, args.new)
        for ratio, key in zip(args.ratios, keys):
            results.put(key, {**rows[ratio], "decode_ms": ms[ratio], "dense_decode_ms": ms["dense"], "steps": args.new,
                              "dense_cache_bytes": cache_bytes(dense.cache)})
        print(f"cost {name}: " + ", ".join(f"{r}: {ms[r]:.1f} ms vs dense {ms['dense']:.1f}" for r in args.ratios), flush=True)


def ppl_section(model, tokenizer, args, results: Results) -> None:
    ids = english_ids(tokenizer, args.ppl_context + args.continuation)
    context, continuation = ids[:, :args.ppl_context], ids[:, args.ppl_context:]
    prefix = None
    for name in ["dense", *args.policies]:
        keys = ["ppl|dense"] if name == "dense" else [f"ppl|{name}|{r}" for r in args.ratios]
        if results.has(*keys):
            continue
        if prefix is None and (name == "dense" or name in SHARED_PREFIX):
            prefix = prefill(model, context[:, :-args.tail])
        if name == "dense":
            nll = continuation_nll(model, dense_start(model, context, prefix), continuation)
            results.put("ppl|dense", {"nll": nll, "perplexity": float(torch.tensor(nll).exp())})
            continue
        for ratio, start in starts(model, name, context, args.ratios, prefix):
            with attnzoo.compress(model, name, ratio=ratio):
                nll = continuation_nll(model, start, continuation)
            results.put(f"ppl|{name}|{ratio}", {"nll": nll, "perplexity": float(torch.tensor(nll).exp())})
        print(f"ppl {name} done", flush=True)


def passkey_section(model, tokenizer, args, results: Results) -> None:
    depths = [(i + 0.5) / args.trials for i in range(args.trials)]
    stop = tokenizer.eos_token_id
    for context in args.passkey_contexts:
        for trial, (depth, key) in enumerate(passkey_plan(depths, 1, seed=0)):
            ids, position = passkey_prompt(tokenizer, context, depth, key)
            prefix = None
            for name in ["dense", *args.passkey_policies]:
                prefix_key = f"passkey|{context}|{trial}|{name}"
                keys = [prefix_key] if name == "dense" else [f"{prefix_key}|{r}" for r in args.ratios]
                if results.has(*keys):
                    continue
                if prefix is None and (name == "dense" or name in SHARED_PREFIX):
                    prefix = prefill(model, ids[:, :-args.tail])
                trial_info = {"depth": depth, "key": key, "tokens": ids.shape[1], "key_position": position}

                def record(result_key: str, tokens: list[int]) -> None:
                    answer = tokenizer.decode(tokens, skip_special_tokens=True)
                    results.put(result_key, {**trial_info, "answer": answer.strip(), "correct": answer_is(answer, key)})

                if name == "dense":
                    record(prefix_key, greedy(model, dense_start(model, ids, prefix), args.answer_tokens, stop))
                    continue
                for ratio, start in starts(model, name, ids, args.ratios, prefix):
                    with attnzoo.compress(model, name, ratio=ratio):
                        record(f"{prefix_key}|{ratio}", greedy(model, start, args.answer_tokens, stop))
            print(f"passkey {context} trial {trial} done", flush=True)


def report(path: str) -> str:
    """The Markdown table of the results in ``path`` (what has been measured so far)."""
    data = json.loads(Path(path).read_text())
    args, results = data["args"], data["results"]
    contexts = [int(c) for c in args["passkey_contexts"]]
    named = {k.split("|")[3 if k.startswith("passkey|") else 1] for k in results}
    names = ["dense"] + sorted(named - {"dense"})
    lines = [f"| cache | KV MB held | vs dense | prefill s (x dense) | decode ms/token (x dense, interleaved) | "
             + " | ".join(f"passkey {c}" for c in contexts) + f" | ppl {args['continuation']} after {args['ppl_context']} |",
             "|" + "---|" * (6 + len(contexts))]
    dense = results.get("cost|dense", {})
    for name in names:
        for ratio in ([None] if name == "dense" else args["ratios"]):
            tail = "" if ratio is None else f"|{ratio}"
            cost = results.get(f"cost|{name}{tail}", {})
            label = "dense" if ratio is None else f"`{name}` {ratio}"
            kv = cost.get("cache_bytes", dense.get("cache_bytes") if ratio is None else None)
            cells = [label, f"{kv / 2**20:.1f}" if kv else "-",
                     f"{dense['cache_bytes'] / kv:.2f}x smaller" if kv and dense and ratio is not None else ("1x" if kv else "-")]
            if ratio is None:
                cells += [f"{dense['prefill_s']:.1f}" if dense else "-", "-"]
            elif cost:
                cells += [f"{cost['prefill_s']:.1f} ({cost['prefill_s'] / dense['prefill_s']:.2f})",
                          f"{cost['decode_ms']:.1f} ({cost['decode_ms'] / cost['dense_decode_ms']:.2f}; dense {cost['dense_decode_ms']:.1f})"]
            else:
                cells += ["-", "-"]
            for c in contexts:
                trials = [results[k] for t in range(args["trials"]) if (k := f"passkey|{c}|{t}|{name}{tail}") in results]
                cells.append(f"{sum(t['correct'] for t in trials)}/{len(trials)}" if trials else "-")
            ppl = results.get(f"ppl|{name}{tail}")
            cells.append(f"{ppl['perplexity']:.2f}" if ppl else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policies", default=None, help="comma-separated registry names (default: every registered cache policy)")
    p.add_argument("--passkey-policies", default=None, help="the policies of the passkey section (default: --policies)")
    p.add_argument("--ratios", default="0.5,0.25,0.125")
    p.add_argument("--sections", default="cost,ppl,passkey")
    p.add_argument("--cost-context", type=int, default=7168)
    p.add_argument("--new", type=int, default=16, help="decode steps timed per cache in the cost section")
    p.add_argument("--passkey-contexts", default="7168,4096")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--ppl-context", type=int, default=4096)
    p.add_argument("--continuation", type=int, default=512)
    p.add_argument("--tail", type=int, default=64, help="prompt tokens prefilled under the shared-prefix policies")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="attnzoo-results/cache_table.json")
    p.add_argument("--report", action="store_true", help="print the table of --out and stop")
    args = p.parse_args()
    if args.report:
        print(report(args.out))
        return
    known = [info.name for info in list_policies()]
    args.policies = known if args.policies is None else [n for n in args.policies.split(",") if n]
    args.passkey_policies = args.policies if args.passkey_policies is None else [n for n in args.passkey_policies.split(",") if n]
    unknown = sorted(set(args.policies + args.passkey_policies) - set(known))
    if unknown:
        p.error(f"--policies: unknown cache policies {unknown}; registered: {known}")
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.passkey_contexts = [int(x) for x in args.passkey_contexts.split(",") if x]
    if args.threads:
        torch.set_num_threads(args.threads)
    from attnzoo import models

    model, tokenizer = models.load("smollm2-135m")
    run = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_at_start": os.getloadavg()[0],
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__}
    results = Results(args.out, {"args": {k: v for k, v in vars(args).items() if k != "report"}, "run": run})
    sections = {"cost": cost_section, "ppl": ppl_section, "passkey": passkey_section}
    for section in args.sections.split(","):
        sections[section](model, tokenizer, args, results)
    print(report(args.out))


if __name__ == "__main__":
    main()
