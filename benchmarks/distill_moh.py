"""moh on SmolLM2-135M: train the head routers on the frozen model (calibration text), then perplexity
on the evaluation text with 75% of the heads active per token, routed, against keeping a fixed 75% of
each layer's heads chosen from the same calibration text, in one run (issue 14's moh target).

    OMP_NUM_THREADS=1 python benchmarks/distill_moh.py --steps 60 --seq-len 512 --out runs/moh --json moh.json

Every variant keeps ceil(0.75 * 9) = 7 of each layer's 9 query heads per token. The fixed choices:
``fixed (router score)``, each layer's 7 heads with the highest mean probability under the trained
router over the calibration tokens; ``fixed (ablation)``, each layer's 7 heads whose removal alone
(the other layers exact) raises the calibration loss most. Calibration text: the standard-library
docstrings of ``distill_seer.calibration_text``; evaluation text: :func:`attnzoo.eval.english_text`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import attnzoo
from attnzoo import eval as ev
from attnzoo.distill import distill, text_examples
from attnzoo.distill.checkpoint import trained_methods

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from any folder: the seer script sits beside this one
from distill_seer import calibration_text  # noqa: E402

HEADS, ACTIVE = 9, 0.75


def fixed_heads(kept: list[int]):
    """A moh method that keeps the query heads ``kept`` for every token, each with weight 1 (its router
    ignores the input: zero weights, a bias that ranks the kept heads first)."""
    method = attnzoo.get_method("moh", active=(len(kept) - 0.5) / HEADS)  # ceil(active * HEADS) = len(kept)
    method.materialize(HEADS, 3, 64, 64)
    with torch.no_grad():
        method.router.bias.fill_(-30.0)
        method.router.bias[kept] = 0.0
    return method


@torch.no_grad()
def calibration_loss(model, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of ``model`` on the rows of ``ids`` (B, T)."""
    return float(model(input_ids=ids, labels=ids).loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="the router's learning rate (default: the recipe's)")
    parser.add_argument("--ablation-from", default=None, help="a JSON of an earlier run: reuse its head ablation (same calibration window)")
    parser.add_argument("--out", default="runs/moh")
    parser.add_argument("--json", default="moh.json")
    args = parser.parse_args()
    model, tokenizer = attnzoo.models.load("smollm2-135m")
    layers = range(model.config.num_hidden_layers)
    keep = math.ceil(ACTIVE * HEADS)
    text = calibration_text()
    train, val = text_examples(tokenizer, text, args.seq_len)
    result = {"active": ACTIVE, "kept_heads": keep, "steps": args.steps, "seq_len": args.seq_len, "train_tokens": args.steps * args.seq_len,
              "context": args.context, "windows": args.windows, "perplexity": {}}
    save = lambda: Path(args.json).write_text(json.dumps(result, indent=1) + "\n")  # noqa: E731

    def ppl(name, **patch):
        if patch:
            with attnzoo.patch(model, **patch):
                value = ev.perplexity(model, tokenizer, context_len=args.context, windows=args.windows, show_progress=False).perplexity
        else:
            value = ev.perplexity(model, tokenizer, context_len=args.context, windows=args.windows, show_progress=False).perplexity
        result["perplexity"][name] = value
        print(f"{name:32s} {value:.3f}", flush=True)
        save()

    ppl("dense")
    start = time.perf_counter()
    run = distill(model, "moh", train, args.out, steps=args.steps, val=val[:2], active=ACTIVE, lr=args.lr)
    result["train_minutes"], result["last"] = round((time.perf_counter() - start) / 60, 2), run.metrics[-1] if run.metrics else None
    ppl("moh routed (distilled)", method="moh", weights=args.out)
    ppl("moh untrained router", method="moh", active=ACTIVE)

    shapes = {i: (HEADS, 3, 64, 64) for i in layers}
    routers = trained_methods(args.out, "moh", {}, shapes)
    captured = ev.capture_qkv(model, tokenizer, text=text, max_tokens=2 * args.seq_len)
    with torch.no_grad():
        scores = {i: torch.softmax(routers[i].router(c.q).float(), -1).mean((0, 1)) for i, c in captured.items()}
    by_score = {i: sorted(s.topk(keep).indices.tolist()) for i, s in scores.items()}
    result["fixed_by_router_score"] = by_score
    ppl("fixed (router score)", layers={i: fixed_heads(h) for i, h in by_score.items()})

    probe = train[:1]
    base = calibration_loss(model, probe)
    harm = {}
    if args.ablation_from:
        earlier = json.loads(Path(args.ablation_from).read_text())
        harm = {int(i): h for i, h in earlier["ablation_loss_added"].items()}
    for i in (i for i in layers if i not in harm):  # each head's removal alone: the calibration loss it adds
        harm[i] = []
        for h in range(HEADS):
            with attnzoo.patch(model, layers={i: fixed_heads([g for g in range(HEADS) if g != h])}):
                harm[i].append(calibration_loss(model, probe) - base)
        print(f"layer {i}: loss added by removing each head {[round(x, 4) for x in harm[i]]}", flush=True)
    by_ablation = {i: sorted(torch.tensor(harm[i]).topk(keep).indices.tolist()) for i in layers}  # the heads it hurts most to lose
    result["ablation_loss_added"], result["fixed_by_ablation"] = harm, by_ablation
    ppl("fixed (ablation)", layers={i: fixed_heads(h) for i, h in by_ablation.items()})
    print(f"training: {args.steps} steps, {args.steps * args.seq_len} tokens, {result['train_minutes']} min (2-core CPU, under load)")


if __name__ == "__main__":
    main()
