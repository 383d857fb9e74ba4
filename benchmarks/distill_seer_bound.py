"""seer against its bound on SmolLM2-135M at 4K tokens, every method at the same block size and budget.

    OMP_NUM_THREADS=1 python benchmarks/distill_seer_bound.py bound --weights runs/seer --out seer_bound.json
    OMP_NUM_THREADS=1 python benchmarks/distill_seer_bound.py cost --tokens 16384 --weights runs/seer --out seer_cost.json

``bound``: on the evaluation text (:func:`attnzoo.eval.english_text`, never seen by the gate), for
the *oracle* block selection (each query block keeps the ``--top-k`` key blocks that hold the most
exact attention mass of its queries: block_sparse ``sampled_q`` with every query of the block as a
sample, which is the exact block mass), the distilled seer gate, block_sparse ``sampled_q`` (4
samples) and hip with ``candidates``: the density each one actually used (blocks kept over the
causal area, the always-kept diagonal / first / local blocks included), the recall of the exact
attention mass on captured q/k against :func:`attnzoo.eval.oracle_recall` (the best support of
64 x 64 tiles at that same density) and the perplexity at ``--context`` tokens. Results go to
``--out`` as they come.

``cost``: one causal call at ``--tokens`` tokens (H=9 query heads, 3 kv heads, D=64, random q/k/v,
the gate of layer ``--layer`` of the checkpoint): the gate's share (pooling, per-head linear maps,
block scores, top-k: ``selection_ms`` of ``return_stats``) against the attention (``attention_ms``),
medians over ``--repeats`` calls in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import attnzoo
from attnzoo import eval as ev
from attnzoo.distill.checkpoint import trained_methods
from attnzoo.eval.approximation import attention_recall
from attnzoo.kernels.dense import causal_mask


def counting(method, densities: list):
    """``method`` with its forward recording each prefill call's density into ``densities``."""
    forward = method.forward

    def recorded(q, k, v, *, return_stats=False, **options):
        out, stats = forward(q, k, v, return_stats=True, **options)
        if q.shape[2] > 1:
            densities.append(stats.density)
        return (out, stats) if return_stats else out

    method.forward = recorded
    return method


CASE_NAMES = {"oracle": "oracle (exact block mass)", "seer": "seer (distilled)", "sampled_q": "block_sparse sampled_q",
              "hip": "hip candidates=8"}


def cases(args, shapes) -> dict:
    """{name: {layer: Method}} at one block size and budget (hip's ``top_k`` does not count its 3 always-kept blocks)."""
    b, k = args.block_size, args.top_k
    per_layer = lambda name, **cfg: {i: attnzoo.get_method(name, **cfg) for i in shapes}  # noqa: E731
    built = {
        "oracle": lambda: per_layer("block_sparse", estimator="sampled_q", samples=b, top_k=k, block_size=b),
        "seer": lambda: trained_methods(args.weights, "seer", {"top_k": k, "block_size": b}, shapes),
        "sampled_q": lambda: per_layer("block_sparse", estimator="sampled_q", top_k=k, block_size=b),
        "hip": lambda: per_layer("hip", top_k=k - 3, block_size=b, candidates=8),
    }
    return {CASE_NAMES[c]: built[c]() for c in args.cases}


def bound(args) -> None:
    model, tokenizer = attnzoo.models.load("smollm2-135m")
    shapes = {i: (9, 3, 64, 64) for i in range(model.config.num_hidden_layers)}
    out = Path(args.out)
    result = {"context": args.context, "block_size": args.block_size, "top_k": args.top_k, "weights": str(args.weights),
              "recall_layers": args.layers, "recall": {}, "perplexity": {}, "density_in_perplexity": {}}
    save = lambda: out.write_text(json.dumps(result, indent=1) + "\n")  # noqa: E731
    captured = ev.capture_qkv(model, tokenizer, layers=args.layers, max_tokens=args.context)
    for name, methods in cases(args, shapes).items():
        rows = []
        for i, c in captured.items():
            support = methods[i].support(c.q, c.k, c.v, causal=True, scale=c.scale).expand(1, c.q.shape[1], -1, -1)
            allowed = causal_mask(c.q.shape[2], c.k.shape[2], c.q.device)
            density = float((support & allowed).sum()) / (float(allowed.sum()) * c.q.shape[1])
            recall = float(attention_recall(c.q, c.k, support, causal=True, scale=c.scale).mean())
            best = float(ev.oracle_recall(c.q, c.k, causal=True, scale=c.scale, density=density, block_size=args.block_size).mean())
            rows.append({"layer": i, "density": density, "recall": recall, "oracle_recall": best})
        mean = lambda key: statistics.mean(r[key] for r in rows)  # noqa: E731
        result["recall"][name] = {"density": mean("density"), "recall": mean("recall"), "oracle_recall": mean("oracle_recall"),
                                  "ratio": mean("recall") / mean("oracle_recall"), "layers": rows}
        print(f"{name:28s} density {mean('density'):.4f} recall {mean('recall'):.4f} oracle_recall {mean('oracle_recall'):.4f} "
              f"ratio {mean('recall') / mean('oracle_recall'):.4f}", flush=True)
        save()
    del captured
    if not args.no_dense:
        result["perplexity"]["dense"] = ev.perplexity(model, tokenizer, context_len=args.context, show_progress=False).perplexity
        print(f"{'dense':28s} perplexity {result['perplexity']['dense']:.3f}", flush=True)
        save()
    for name, methods in cases(args, shapes).items():
        densities: list[float] = []
        with attnzoo.patch(model, layers={i: counting(m, densities) for i, m in methods.items()}):
            ppl = ev.perplexity(model, tokenizer, context_len=args.context, show_progress=False).perplexity
        result["perplexity"][name], result["density_in_perplexity"][name] = ppl, statistics.mean(densities)
        print(f"{name:28s} perplexity {ppl:.3f} density {statistics.mean(densities):.4f}", flush=True)
        save()


def cost(args) -> None:
    torch.manual_seed(0)
    shapes = {i: (9, 3, 64, 64) for i in range(30)}  # SmolLM2-135M's layers, as the checkpoint holds them
    gate = trained_methods(args.weights, "seer", {"top_k": args.top_k, "block_size": args.block_size}, shapes)[args.layer]
    q, k, v = torch.randn(1, 9, args.tokens, 64), torch.randn(1, 3, args.tokens, 64), torch.randn(1, 3, args.tokens, 64)
    selection, attention = [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            _, stats = gate(q, k, v, causal=True, return_stats=True)
            selection.append(stats.selection_ms)
            attention.append(stats.attention_ms)
    result = {"tokens": args.tokens, "heads": 9, "kv_heads": 3, "head_dim": 64, "threads": torch.get_num_threads(),
              "block_size": args.block_size, "top_k": args.top_k, "density": stats.density,
              "selection_ms": selection, "attention_ms": attention,
              "gate_share_of_attention": statistics.median(selection) / statistics.median(attention)}
    print(f"gate {statistics.median(selection):.1f} ms, attention {statistics.median(attention):.1f} ms (medians of "
          f"{args.repeats}); gate / attention = {result['gate_share_of_attention']:.3f}; density {stats.density:.4f}", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=("bound", "cost"))
    parser.add_argument("--weights", required=True, help="a seer checkpoint folder (attnzoo distill)")
    parser.add_argument("--top-k", type=int, default=12)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--layers", type=int, nargs="+", default=list(range(0, 30, 3)), help="bound: layers whose recall is measured")
    parser.add_argument("--cases", nargs="+", choices=list(CASE_NAMES), default=list(CASE_NAMES), help="bound: the selections measured")
    parser.add_argument("--no-dense", action="store_true", help="bound: skip dense perplexity (measured in an earlier run)")
    parser.add_argument("--tokens", type=int, default=16384, help="cost: sequence length")
    parser.add_argument("--layer", type=int, default=15, help="cost: the checkpoint layer whose gate runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    bound(args) if args.task == "bound" else cost(args)


if __name__ == "__main__":
    main()
