"""hedgehog on SmolLM2-135M: linearise 8 of the 30 layers by attention transfer, then perplexity on the
evaluation text with dense attention, the same layers swapped to elu+1 linear attention (``linear``), and
the same layers swapped to the distilled Hedgehog feature maps (issue 14's hedgehog target: hedgehog
should close at least half of the gap that elu+1 opens).

    OMP_NUM_THREADS=1 python benchmarks/distill_hedgehog.py --steps 40 --seq-len 512 --out runs/hedgehog

Calibration text: the standard-library docstrings of ``distill_seer.calibration_text``; evaluation text:
:func:`attnzoo.eval.english_text` (the language reference), never seen in training. Full-layer
linearisation only: the LoLCATs sliding-window + linear hybrid is not built in ``attnzoo.distill``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import attnzoo
from attnzoo import eval as ev
from attnzoo.distill import distill, text_examples

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from any folder: the seer script sits beside this one
from distill_seer import calibration_text  # noqa: E402

DEFAULT_LAYERS = (3, 6, 9, 12, 15, 18, 21, 24)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--layers", type=int, nargs="+", default=list(DEFAULT_LAYERS))
    parser.add_argument("--out", default="runs/hedgehog")
    args = parser.parse_args()
    model, tokenizer = attnzoo.models.load("smollm2-135m")
    train, val = text_examples(tokenizer, calibration_text(), args.seq_len)
    start = time.perf_counter()
    run = distill(model, "hedgehog", train, args.out, steps=args.steps, val=val[:2], layers=args.layers)
    minutes = (time.perf_counter() - start) / 60
    rows = {}

    def ppl(name, method=None, **config):
        if method is None:
            rows[name] = ev.perplexity(model, tokenizer, context_len=args.context, windows=args.windows).perplexity
        else:
            with attnzoo.patch(model, method, **config):
                rows[name] = ev.perplexity(model, tokenizer, context_len=args.context, windows=args.windows).perplexity
        print(f"{name:40s} {rows[name]:.3f}", flush=True)

    ppl("dense")
    ppl("linear (elu+1)", "linear", layers=args.layers)
    ppl("hedgehog (untrained map)", "hedgehog", layers=args.layers)
    ppl("hedgehog (distilled)", "hedgehog", weights=args.out)
    gap_closed = (rows["linear (elu+1)"] - rows["hedgehog (distilled)"]) / (rows["linear (elu+1)"] - rows["dense"])
    print(f"share of the elu+1 gap closed by hedgehog: {gap_closed:.3f}")
    tokens = args.steps * args.seq_len
    result = {"layers": args.layers, "context": args.context, "windows": args.windows, "steps": args.steps,
              "seq_len": args.seq_len, "train_tokens": tokens, "train_minutes": round(minutes, 2), "perplexity": rows,
              "gap_closed": round(gap_closed, 4), "last": run.metrics[-1]}
    print(f"training: {args.steps} steps, {tokens} tokens, {minutes:.1f} min (2-core CPU, under load)")
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
