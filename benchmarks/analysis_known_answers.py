"""Known answers of attnzoo.analysis on real weights (SmolLM2-135M, MiniLM-L6), short and offline.

    python benchmarks/analysis_known_answers.py [--out attnzoo-results/analysis] [--part sinks,lrp,faithfulness,rank]

Prints the tables the README records and writes their JSON (and the deletion plot, with
matplotlib) into ``--out``. Accuracies and counts only; nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from attnzoo import models
from attnzoo.analysis import lrp, record, rollout, sinks, sr_map
from attnzoo.analysis.faithfulness import deletion_area, deletion_curve, deletion_order
from attnzoo.analysis.rank import rank

TEXTS = [
    "The capital of France is Paris. The capital of Italy is",
    "Alice gave the book to Bob because he asked for it. Later, Bob returned the book to",
    "One, two, three, four, five, six, seven,",
    "The cat sat on the mat. The dog sat on the",
    "In 1969, Neil Armstrong became the first person to walk on the",
    "Water boils at 100 degrees Celsius, and it freezes at",
    "She opened the door, turned on the light, and sat down at her",
    "The opposite of hot is cold, and the opposite of up is",
]
LONG = " ".join(TEXTS) * 4


def sink_table(model, tokenizer) -> dict:
    """Per layer: the fraction of heads whose first token is a sink, and the other sinks, over TEXTS."""
    rows = []
    for text in TEXTS:
        rec = record(model, text, tokenizer=tokenizer)
        tokens = rec.tokens[0]
        for layer, probs in zip(rec.layers, rec.probs):
            found = sinks(probs, causal=True, min_queries=4)
            rows.append({"layer": layer, "first": found.head_fraction(0), "other": [tokens[p] for p in found.other_sinks()]})
    layers = sorted({r["layer"] for r in rows})
    table = []
    for layer in layers:
        mine = [r for r in rows if r["layer"] == layer]
        others: dict[str, int] = {}
        for r in mine:
            for t in r["other"]:
                others[t] = others.get(t, 0) + 1
        table.append({"layer": layer, "first_token_heads": sum(r["first"] for r in mine) / len(mine),
                      "other_sinks": dict(sorted(others.items(), key=lambda kv: -kv[1])[:4])})
    upper = [r["first_token_heads"] for r in table if r["layer"] >= len(layers) // 2]
    return {"layers": table, "upper_half_mean_first_token_heads": sum(upper) / len(upper)}


def conservation(model, tokenizer, texts, **options) -> dict:
    """AttnLRP and CP-LRP conservation: |relevance at each block input - logit| / |logit|."""
    out = {}
    for rule in ("attnlrp", "cp"):
        gaps_input, gaps_worst, steps = [], [], []
        for text in texts:
            rel = lrp(model, text, tokenizer=tokenizer, rule=rule, **options)
            gap = ((rel.layers[0] - rel.logit[0]).abs() / rel.logit[0].abs())
            gaps_input.append(float(gap[0]))
            gaps_worst.append(float(gap.max()))
            steps.append(float((rel.layers[0].diff().abs() / rel.logit[0].abs()).max()))
        out[rule] = {"input_gap_mean": sum(gaps_input) / len(texts), "worst_block_gap_max": max(gaps_worst),
                     "largest_one_block_change": max(steps)}
    return out


def raw_attention(model, ids) -> torch.Tensor:
    rec = record(model, ids)
    return rec.probs[-1][0].mean(0)[-1]


def faithfulness(model, tokenizer, out: Path, steps: int = 10) -> dict:
    """Deletion curves per attribution (tokens removed, highest first; the first token and the
    explained last one kept), mean over TEXTS: the target logit as a fraction of the full-input
    logit, and the target log-probability."""
    curves: dict[str, dict[str, list[list[float]]]] = {"logit": {}, "log_prob": {}}
    rng = random.Random(0)
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        rel = lrp(model, ids)
        target = int(rel.target[0])
        keep = [0, ids.shape[1] - 1]
        orders = {
            "lrp (AttnLRP)": deletion_order(rel.tokens[0], keep=keep),
            "sr_map": deletion_order(sr_map(rel.tokens)[0], keep=keep),
            "gradient x input": deletion_order(lrp(model, ids, target=target, rule="gradient").tokens[0], keep=keep),
            "rollout": deletion_order(rollout(record(model, ids).probs)[0, -1], keep=keep),
            "raw attention (last layer)": deletion_order(raw_attention(model, ids), keep=keep),
        }
        for trial in range(3):
            shuffled = list(range(1, ids.shape[1] - 1))
            rng.shuffle(shuffled)
            orders[f"random {trial}"] = shuffled
        full = float(rel.logit[0])
        for value, scale in (("logit", full), ("log_prob", 1.0)):
            for name, order in orders.items():
                ys = deletion_curve(model, ids, order, target=target, steps=steps, value=value)
                curves[value].setdefault(name.split(" ")[0] if name.startswith("random") else name, []).append([y / scale for y in ys])
    result = {}
    for value, by_name in curves.items():
        mean = {name: [sum(c[i] for c in cs) / len(cs) for i in range(steps + 1)] for name, cs in by_name.items()}
        table = sorted(({"attribution": name, "area": deletion_area(c), "at_20%": c[2], "at_50%": c[5]} for name, c in mean.items()),
                       key=lambda r: r["area"])
        result[value] = {"table": table, "curves": mean}
        try:
            from attnzoo.analysis.pictures import curves_png

            curves_png(mean, out / f"deletion_{value}.png",
                       ylabel="target logit / full-input logit" if value == "logit" else "target log-probability",
                       title=f"SmolLM2-135M deletion curves ({len(TEXTS)} prompts)")
        except ImportError:
            pass
    return result


def rank_table(model, tokenizer) -> dict:
    """RALA's comparison on captured post-RoPE q/k/v of one ~400-token text, per layer and overall."""
    rec = record(model, LONG, tokenizer=tokenizer, qkv=True)
    reports = [rank(q, k, v, causal=True) for q, k, v in zip(rec.q, rec.k, rec.v)]
    rows = [{"layer": i, **r.summary()} for i, r in zip(rec.layers, reports)]
    keys = ("kv_numerical", "kv_effective", "output_numerical", "output_effective")
    return {"tokens": rec.input_ids.shape[1], "bound": reports[0].bound, "layers": rows,
            "mean": {k: sum(r[k] for r in rows) / len(rows) for k in keys},
            "layers_kv_below_output": sum(r["kv_effective"] < r["output_effective"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="attnzoo-results/analysis")
    parser.add_argument("--part", default="sinks,lrp,faithfulness,rank")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.part.split(",")
    torch.manual_seed(0)
    model, tokenizer = models.load("smollm2-135m", cache=True)
    results = {}
    if "sinks" in parts:
        results["sinks"] = sink_table(model, tokenizer)
        print(json.dumps({k: v for k, v in results["sinks"].items() if k != "layers"}))
        for r in results["sinks"]["layers"]:
            print(f"layer {r['layer']:2d}  first-token sink heads {r['first_token_heads']:.2f}  other sinks {r['other_sinks']}")
    if "lrp" in parts:
        results["lrp_smollm2"] = conservation(model, tokenizer, TEXTS)
        encoder, encoder_tokenizer = models.load("minilm-l6", cache=True)
        results["lrp_minilm"] = conservation(encoder, encoder_tokenizer, TEXTS[:4], position=0)
        print(json.dumps({k: results[k] for k in ("lrp_smollm2", "lrp_minilm")}, indent=1))
    if "faithfulness" in parts:
        results["faithfulness"] = faithfulness(model, tokenizer, out)
        for value, part in results["faithfulness"].items():
            print(value)
            for r in part["table"]:
                print(f"  {r['attribution']:28s} area {r['area']:.3f}  at 20% deleted {r['at_20%']:.3f}  at 50% {r['at_50%']:.3f}")
    if "rank" in parts:
        results["rank"] = rank_table(model, tokenizer)
        print(json.dumps({k: v for k, v in results["rank"].items() if k != "layers"}))
    (out / f"known_answers_{'_'.join(parts)}.json").write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
