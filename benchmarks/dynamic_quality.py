"""Quality of the dynamic methods on SmolLM2-135M (offline; needs the [models] extra and the model files).

    python benchmarks/dynamic_quality.py recall      [--tokens 4096] [--layers 0 5 10 ...] [--density 0.1] [--matched-oracle] [--qkv FILE]
    python benchmarks/dynamic_quality.py perplexity  [--tokens 4096] [--windows 2]
    python benchmarks/dynamic_quality.py TASK --defaults    # hip, block_sparse, vertical_slash with no options
    python benchmarks/dynamic_quality.py passkey     [--tokens 7168] [--n 3] [--json FILE] [--case-at TOKENS METHOD JSON]

``recall``: on q/k/v captured from the model (post-RoPE), each method's density actually used,
recall of the exact attention mass and relative output error, averaged over layers and heads; and
the bound: the most mass any support of ``--density`` keeps, made of b x b tiles (what a selection
with b-token blocks could reach if it knew the exact attention) or of single entries.
``perplexity``: the patched model's perplexity on the first ``--tokens`` tokens of the English text
against dense. ``passkey``: exact-match passkey retrieval at about ``--tokens`` tokens, one mark per
trial (+ found, . missed; ``--n`` keys per depth, depths in order), and how many of the keys that
dense attention finds each method finds too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch

import attnzoo
from attnzoo import eval as ev
from attnzoo import models
from attnzoo.kernels.dense import sdpa
from attnzoo.search import head_scores

RECALL_CASES = [  # each at <= 10% density on 4K tokens
    ("streaming", dict(sinks=64, window=140)),
    ("vertical_slash", dict(vertical_blocks=4, slash_blocks=7, block_size=32)),
    ("vertical_slash", dict(vertical_blocks=8, slash_blocks=14, block_size=16)),
    ("vertical_slash", dict(vertical_blocks=1, slash_blocks=14, block_size=16, vertical_columns=150)),
    ("block_sparse", dict(top_k=7, block_size=32)),
    ("block_sparse", dict(top_k=13, block_size=16)),
    ("block_sparse", dict(top_k=13, block_size=16, estimator="sampled_q")),
    ("hip", dict(top_k=11, block_size=16)),
    ("hip", dict(top_k=11, block_size=16, query_samples=4)),
    ("hip", dict(top_k=11, block_size=16, branch_score="bound")),
    ("hip", dict(top_k=10, block_size=16, branch_score="bound", candidates=8)),
]
ORACLE_BLOCKS = [64, 32, 16, None]  # None: single entries
PPL_CASES = [  # each at <= 15% density on 4K tokens
    ("vertical_slash", dict(vertical_blocks=6, slash_blocks=10, block_size=32)),
    ("vertical_slash", dict(vertical_blocks=8, slash_blocks=14, block_size=16, estimate_queries="spread", last_q=256)),
    ("vertical_slash", dict(vertical_blocks=1, slash_blocks=12, block_size=16, vertical_columns=200, estimate_queries="spread",
                            last_q=256)),
    ("vertical_slash", dict(vertical_blocks=1, slash_blocks=12, block_size=16, vertical_columns=200, estimate_queries="spread",
                            last_q=4096)),  # every query: the lines that hold the most mass of this text
    ("block_sparse", dict(top_k=20, block_size=16)),
    ("block_sparse", dict(top_k=20, block_size=16, estimator="sampled_q")),
    ("block_sparse", dict(top_k=20, block_size=16, estimator="sampled_q", samples=16)),  # every query: exact block mass
    ("hip", dict(top_k=17, block_size=16)),
    ("hip", dict(top_k=17, block_size=16, query_samples=4)),
    ("hip", dict(top_k=17, block_size=16, branch_score="bound")),
    ("hip", dict(top_k=17, block_size=16, candidates=8)),
    ("hip", dict(top_k=17, block_size=16, branch_score="bound", candidates=8)),
    ("streaming", dict(sinks=64, window=256)),
]
PASSKEY_CASES = [
    ("vertical_slash", dict(vertical_blocks=6, slash_blocks=10, block_size=32)),
    ("vertical_slash", dict(vertical_blocks=1, slash_blocks=10, block_size=32, vertical_columns=200)),
    ("block_sparse", dict(top_k=20, block_size=16, estimator="sampled_q")),
    ("hip", dict(top_k=17, block_size=16, query_samples=4)),
    ("hip", dict(top_k=17, block_size=16)),
    ("hip", dict(top_k=17, block_size=16, branch_score="bound")),
    ("hip", dict(top_k=34, block_size=16, branch_score="bound")),
    ("hip", dict(top_k=34, block_size=16, query_samples=4)),
    ("hip", dict(top_k=17, block_size=16, branch_score="bound", candidates=8)),
    ("hip", dict(top_k=34, block_size=16, branch_score="bound", candidates=8)),
    ("streaming", dict(sinks=64, window=256)),
]


DEFAULT_CASES = [("block_sparse", {}), ("hip", {}), ("vertical_slash", {})]
# The options the built-in cases ran with in the README's 2026-11-25 tables, defaults then, filled
# in where a case leaves them unset (the defaults have followed the budget rule since)
MEASURED_AS = {
    "block_sparse": dict(estimator="pooled_qk"),
    "hip": dict(candidates=1),  # and the pooled branch score without query_samples
    "vertical_slash": dict(last_q=64, estimate_queries="last", vertical_columns=0, last_columns=0),
}


def as_measured(cases: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """``cases`` with the options of :data:`MEASURED_AS` filled in where unset."""
    out = []
    for name, cfg in cases:
        filled = MEASURED_AS.get(name, {}) | cfg
        if name == "hip" and not filled.get("query_samples"):
            filled = {"branch_score": "pooled"} | filled
        out.append((name, filled))
    return out


RECALL_CASES, PPL_CASES, PASSKEY_CASES = as_measured(RECALL_CASES), as_measured(PPL_CASES), as_measured(PASSKEY_CASES)


def recall(a, model, tokenizer) -> None:
    if a.qkv and os.path.exists(a.qkv):  # captured before with the same --tokens and --layers
        captured = torch.load(a.qkv, weights_only=False)
    else:
        captured = ev.capture_qkv(model, tokenizer, max_tokens=a.tokens, layers=a.layers)
        if a.qkv:
            torch.save(captured, a.qkv)
    print(f"SmolLM2-135M, {a.tokens} tokens, layers {sorted(captured)}; means over layers and heads")
    specs = [{"method": name, "config": cfg} for name, cfg in RECALL_CASES]
    recalls, densities, errors, bounds = ([[] for _ in specs] for _ in range(4))
    for c in captured.values():
        exact = sdpa(c.q, c.k, c.v, causal=c.causal, scale=c.scale)
        for i, ((r, d), spec) in enumerate(zip(head_scores(c.q, c.k, c.v, c.causal, c.scale, specs), specs)):
            method = attnzoo.get_method(spec["method"], **spec["config"])
            out = method(c.q, c.k, c.v, causal=c.causal, scale=c.scale)
            recalls[i].append(float(r.mean()))
            densities[i].append(float(d.mean()))
            errors[i].append(float((out - exact).norm() / exact.norm()))
            if a.matched_oracle:  # the best support of the same density made of the same tiles
                block = spec["config"].get("block_size") or method.budgets_used()[0]["block_size"]
                bounds[i].append(float(ev.oracle_recall(c.q, c.k, causal=c.causal, scale=c.scale, density=densities[i][-1],
                                                        block_size=block).mean()))
    for (name, cfg), r, d, e, o in zip(RECALL_CASES, recalls, densities, errors, bounds):
        matched = f"  oracle at that density and block {statistics.mean(o):.3f} (ratio {statistics.mean(r) / statistics.mean(o):.3f})" if o else ""
        print(f"{name:15s} density {statistics.mean(d):.3f}  recall {statistics.mean(r):.3f} (worst layer {min(r):.3f})  "
              f"rel. error {statistics.mean(e):.3f}{matched}  {cfg}", flush=True)
    for block in [] if a.matched_oracle else ORACLE_BLOCKS:
        kept = [float(ev.oracle_recall(c.q, c.k, causal=c.causal, scale=c.scale, density=a.density, block_size=block).mean())
                for c in captured.values()]
        tiles = "single entries" if block is None else f"{block}x{block} tiles"
        print(f"{'bound':15s} density {a.density:.3f}  recall {statistics.mean(kept):.3f} (worst layer {min(kept):.3f})  "
              f"best support of {tiles}", flush=True)


def counted(name: str, cfg: dict):
    """The method, plus the list that receives the density of each of its prefill calls."""
    densities = []
    base = type(attnzoo.get_method(name, **cfg))

    def call(self, q, k, v, *, return_stats=False, **options):
        out, stats = base.__call__(self, q, k, v, return_stats=True, **options)
        if q.shape[2] > 1:  # prefill calls, not decoding steps
            densities.append(stats.density)
        return (out, stats) if return_stats else out

    return type(f"Counted{base.__name__}", (base,), {"__call__": call})(**cfg), densities


def shown(method, cfg: dict) -> str:
    """The config as given, or for defaults the prefill budgets the rule chose."""
    if cfg or not hasattr(method, "budgets_used"):
        return str(cfg)
    return f"defaults, prefill budgets {[b for b in method.budgets_used() if b.get('block_size')][:3]}"


def perplexity(a, model, tokenizer) -> None:
    dense = a.dense_ppl or ev.perplexity(model, tokenizer, context_len=a.tokens, windows=a.windows, show_progress=False).perplexity
    given = " (given, --dense-ppl)" if a.dense_ppl else ""
    print(f"SmolLM2-135M perplexity at {a.tokens} tokens ({a.windows} windows): dense {dense:.3f}{given}", flush=True)
    for name, cfg in PPL_CASES:
        method, densities = counted(name, cfg)
        with attnzoo.patch(model, method):
            ppl = ev.perplexity(model, tokenizer, context_len=a.tokens, windows=a.windows, show_progress=False).perplexity
        print(f"{name:15s} ppl {ppl:.3f} ({(ppl / dense - 1) * 100:+.2f}% vs dense)  density {statistics.mean(densities):.3f}  "
              f"{shown(method, cfg)}", flush=True)


def passkey(a, model, tokenizer) -> None:
    runs = [(a.tokens, name, cfg) for name, cfg in PASSKEY_CASES]
    runs += [(int(tokens), name, json.loads(cfg)) for tokens, name, cfg in a.case_at or []]
    lengths = list(dict.fromkeys(tokens for tokens, _, _ in runs))
    if not a.skip_dense:  # dense first at each length, in the same run
        runs = [r for n in lengths for r in [(n, "dense", {})] + [r for r in runs if r[0] == n]]
    saved = json.load(open(a.json)) if a.json and os.path.exists(a.json) else {}
    print(f"SmolLM2-135M passkey at about {lengths} tokens, {a.n} keys x depths {a.depths}")

    def trials(result) -> str:  # one mark per trial in depth order: + found, . missed
        return "".join("+" if t["correct"] else "." for t in result["trials"])

    dense = {}
    for tokens, name, cfg in runs:
        key = f"{tokens} {name} {json.dumps(cfg, sort_keys=True)}"
        record = saved.get(key)
        if record is None or not record["complete"] or len(record["trials"]) != a.n * len(a.depths):  # (re)run it whole: one seed draws its keys
            method, densities = (None, []) if name == "dense" else counted(name, cfg)
            record = saved[key] = {"tokens": tokens, "method": name, "config": cfg, "complete": False}

            def save(result, record=record, method=method, densities=densities) -> None:
                record.update(result.as_dict(), densities=list(densities),
                              shown="dense" if method is None else shown(method, cfg))
                if a.json:  # after every trial, so that nothing is lost
                    with open(a.json + ".tmp", "w") as f:
                        json.dump(saved, f, indent=1)
                    os.replace(a.json + ".tmp", a.json)

            with attnzoo.patch(model, method) if method is not None else contextlib.nullcontext():
                result = ev.passkey(model, tokenizer, context_len=tokens, depths=a.depths, n=a.n, show_progress=False,
                                    on_trial=save)
            record["complete"] = True
            save(result)
        if name == "dense":
            dense[tokens] = record
        kept = ""
        if tokens in dense and name != "dense":
            both = sum(t["correct"] and d["correct"] for t, d in zip(record["trials"], dense[tokens]["trials"]))
            kept = f"  found {both} of the {dense[tokens]['correct']} keys dense finds"
        density = f"  density {statistics.mean(record['densities']):.3f}" if record["densities"] else ""
        print(f"{tokens:6d} {name:15s} accuracy {record['accuracy']:.2f}  {trials(record)}{kept}{density}  {record['shown']}",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["recall", "perplexity", "passkey"])
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--layers", type=int, nargs="+", default=None)
    p.add_argument("--density", type=float, default=0.1, help="recall: density of the bound")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--matched-oracle", action="store_true",
                   help="recall: also the oracle bound at each case's own density and block size (eval.oracle_recall)")
    p.add_argument("--windows", type=int, default=1, help="perplexity: consecutive windows of --tokens tokens")
    p.add_argument("--defaults", action="store_true", help="the three methods with no options instead of the cases")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.35, 0.65, 0.9])
    p.add_argument("--skip-dense", action="store_true", help="passkey: do not run the dense baseline")
    p.add_argument("--dense-ppl", type=float, help="perplexity: dense's, measured before with the same --tokens and --windows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--qkv", help="recall: keep the captured q/k/v in this file and reuse it when it exists")
    p.add_argument("--json", help="passkey: write every trial to this JSON file; a rerun skips the cases it holds complete")
    p.add_argument("--case-at", nargs=3, action="append", metavar=("TOKENS", "METHOD", "JSON"),
                   help="passkey: one more case at another length (with dense there too), e.g. --case-at 8240 hip '{}'")
    p.add_argument("--case", nargs=2, action="append", metavar=("METHOD", "JSON"),
                   help="replace the built-in cases of this task, e.g. --case hip '{\"top_k\": 10}'")
    a = p.parse_args()
    if a.case or a.defaults:
        cases = [(name, json.loads(cfg)) for name, cfg in a.case or []] + (DEFAULT_CASES if a.defaults else [])
        globals()[{"recall": "RECALL_CASES", "perplexity": "PPL_CASES", "passkey": "PASSKEY_CASES"}[a.what]] = cases
    a.tokens = a.tokens or (7168 if a.what == "passkey" else 4096)
    torch.set_num_threads(a.threads)
    start = time.time()
    model, tokenizer = models.load("smollm2-135m")
    {"recall": recall, "perplexity": perplexity, "passkey": passkey}[a.what](a, model, tokenizer)
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
