"""hedgehog on SmolLM2-135M: linearise 8 of the 30 layers by attention transfer, then perplexity on the
evaluation text with dense attention, the same layers swapped to elu+1 linear attention (``linear``), to
the distilled Hedgehog feature maps (issue 14's hedgehog target: hedgehog should close at least half of
the gap that elu+1 opens), to the softmax window alone and to the LoLCATs hybrid (``window=w``: the
latest w keys by softmax, the older ones by a Hedgehog map distilled in that hybrid).

    OMP_NUM_THREADS=1 python benchmarks/distill_hedgehog.py --steps 60 --seq-len 512 --window 64 --out runs/hedgehog

Calibration text: the standard-library docstrings of ``distill_seer.calibration_text``; evaluation text:
:func:`attnzoo.eval.english_text` (the language reference), never seen in training. The hybrid trains
into ``OUT_window`` (both runs resume from their folders). ``--window 0``: full-layer linearisation only.
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
    parser.add_argument("--window", type=int, default=64, help="the LoLCATs hybrid's softmax window (0: not run)")
    parser.add_argument("--out", default="runs/hedgehog")
    args = parser.parse_args()
    model, tokenizer = attnzoo.models.load("smollm2-135m")
    train, val = text_examples(tokenizer, calibration_text(), args.seq_len)
    runs, minutes = {}, {}
    for name, folder, config in [("hedgehog", args.out, {}), ("hedgehog window", f"{args.out}_window", {"window": args.window})]:
        if name == "hedgehog window" and not args.window:
            continue
        start = time.perf_counter()
        runs[name] = distill(model, "hedgehog", train, folder, steps=args.steps, val=val[:2], layers=args.layers, **config)
        minutes[name] = round((time.perf_counter() - start) / 60, 2)  # ~0 when the folder already held the finished run
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
    if args.window:
        ppl(f"softmax window {args.window} alone", "sliding_window", layers=args.layers, window=args.window)
        ppl(f"hedgehog + window {args.window} (distilled)", "hedgehog", weights=f"{args.out}_window")
    gap = rows["linear (elu+1)"] - rows["dense"]
    gap_closed = {name: round((rows["linear (elu+1)"] - rows[name]) / gap, 4) for name in rows if "distilled" in name}
    print(f"share of the elu+1 gap closed: {gap_closed}")
    tokens = args.steps * args.seq_len
    result = {"layers": args.layers, "context": args.context, "windows": args.windows, "steps": args.steps, "window": args.window,
              "seq_len": args.seq_len, "train_tokens": tokens, "train_minutes": minutes, "perplexity": rows,
              "gap_closed": gap_closed, "last": {name: run.metrics[-1] if run.metrics else None for name, run in runs.items()}}
    print(f"training: {args.steps} steps, {tokens} tokens each, minutes {minutes} (2-core CPU, under load)")
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
