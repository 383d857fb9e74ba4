"""MoA's searched per-head spans against uniform spans at equal average KV budget, as KV caches (SmolLM2-135M).

    OMP_NUM_THREADS=1 python benchmarks/cache_moa_spans.py --densities 0.25 0.125 --out runs/moa_spans.json

Profiles the model once per ``--losses`` (``moa_profile``: MoA's gradient-weighted influence, the
dropped attention mass) on ``--windows`` sequences of ``--calibration`` tokens of a calibration
text (standard-library docstrings, ``distill_seer.calibration_text``), searches MoA's elastic rules
from it at each density and scope (``moa_search(..., kv_groups=True)``: one rule per KV head; the
budget holding in every layer, or over the whole model), then scores the perplexity of a
``--continuation``-token continuation teacher-forced after a ``--context``-token context (the mean
NLL over ``--eval-windows`` disjoint windows) of the evaluation text
(:func:`attnzoo.eval.english_text`, never seen by the search, except with ``--calibrate-on-eval``:
an in-domain bound profiled on the windows' own contexts), with the dense cache, ``moa_cache``
under uniform spans (alpha 0, beta = density, the same sinks) and under each search's rules.
Reports the keys each cache holds per head after the context (the budgets compared) and writes
the JSON after every measurement; ``--profile-file`` keeps each profile.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

import attnzoo
from attnzoo.cache.moa_search import MoAProfile, moa_profile, moa_search
from attnzoo.eval.common import save_json
from attnzoo.eval.generation import continuation_perplexity, english_ids
from attnzoo.integrations.transformers.compress import cache_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from any folder: the seer script sits beside this one
from distill_seer import calibration_text  # noqa: E402


@torch.no_grad()
def held_keys(model, ids: torch.Tensor) -> tuple[float, int]:
    """(mean keys per KV head, cache bytes) of the cache after prefilling ``ids`` under the active compression."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    lengths = [n for layer in cache.layers for n in layer.head_lengths()]
    return sum(lengths) / len(lengths), cache_bytes(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.125])
    parser.add_argument("--calibration", type=int, default=2048, help="tokens of each calibration sequence searched on")
    parser.add_argument("--windows", type=int, default=1, help="calibration sequences (consecutive windows of the calibration text)")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--continuation", type=int, default=512)
    parser.add_argument("--sinks", type=int, default=64)
    parser.add_argument("--scopes", nargs="+", default=["layer", "model"], choices=["layer", "model"], help="where the search's budget holds")
    parser.add_argument("--losses", nargs="+", default=["gradient", "mass"], choices=["gradient", "mass"], help="what a rule costs a head")
    parser.add_argument("--eval-windows", type=int, default=1, help="disjoint windows of the evaluation text scored (their mean NLL)")
    parser.add_argument("--calibrate-on-eval", action="store_true",
                        help="an in-domain bound: profile on the evaluation windows' contexts instead of the calibration text")
    parser.add_argument("--profile-file", default=None, help="a moa_profile JSON per loss: PATH.<loss>.json, read if present, else written")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/moa_spans.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = attnzoo.models.load("smollm2-135m")
    calibration = tokenizer(calibration_text(), return_tensors="pt").input_ids[0, :args.windows * args.calibration]
    calibration = calibration.reshape(args.windows, args.calibration)
    span = args.context + args.continuation
    windows = english_ids(tokenizer, args.eval_windows * span).reshape(args.eval_windows, span)
    if args.calibrate_on_eval:
        calibration = windows[:, :args.context]
    result = {"model": "smollm2-135m", "context": args.context, "continuation": args.continuation, "calibration": calibration.shape[1], "windows": calibration.shape[0], "calibrate_on_eval": args.calibrate_on_eval, "eval_windows": args.eval_windows,
              "sinks": args.sinks, "threads": args.threads, "runs": []}

    def record(entry: dict) -> None:
        result["runs"].append(entry)
        save_json(args.out, result)
        print(entry, flush=True)

    def scored() -> dict:
        """Mean NLL (and its perplexity) of the continuation over the evaluation windows, under what is active."""
        nlls = [continuation_perplexity(model, w[None], args.context, args.continuation).nll for w in windows]
        nll = sum(nlls) / len(nlls)
        return {"ppl": math.exp(nll), "nll": nll, "window_nlls": nlls}

    start = time.perf_counter()
    record({"cache": "dense", **scored(), "seconds": time.perf_counter() - start})
    profiles = {}
    for loss in args.losses:  # one profile per loss serves every density and scope
        start, saved = time.perf_counter(), None if args.profile_file is None else Path(f"{args.profile_file}.{loss}.json")
        read = saved is not None and saved.exists()
        if read:
            profiles[loss] = MoAProfile.load(saved)
        else:
            profiles[loss] = moa_profile(model, calibration, sinks=args.sinks, loss=loss, densities=args.densities)
            if saved is not None:
                profiles[loss].save(saved)
        record({"profile": loss, "lengths": profiles[loss].lengths, "seconds": time.perf_counter() - start, "read": read})
    for density in args.densities:
        uniform = {"alpha": 0.0, "beta": density, "sinks": args.sinks}
        caches = {"moa uniform": uniform}
        for loss in args.losses:
            for scope in args.scopes:
                start = time.perf_counter()
                found = moa_search(model, profile=profiles[loss], density=density, kv_groups=True, scope=scope)
                record({"search": density, "scope": scope, "loss": loss, "seconds": time.perf_counter() - start, "rules": found["search"]["rules"],
                        "loss_total": found["search"]["loss_total"], "loss_total_uniform": found["search"]["loss_total_uniform"]})
                caches[f"moa searched ({loss}, {scope})"] = {"config": found}
        for name, options in caches.items():
            start = time.perf_counter()
            with attnzoo.compress(model, "moa_cache", **options):
                keys, size = held_keys(model, windows[:1, :args.context])
                result_row = scored()
            record({"cache": name, "density": density, **result_row, "mean_keys_per_head": keys,
                    "cache_bytes_after_context": size, "seconds": time.perf_counter() - start})

if __name__ == "__main__":
    main()
