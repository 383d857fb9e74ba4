"""ACT and EchoAtt on SmolLM2-135M against exact attention: continuation perplexity, passkey, decode speed.

    python benchmarks/act_echo.py --out act_echo.json --threads 1

Calibration (ACT's head search, EchoAtt's layer choice) runs on the standard-library docstrings of
``distill_seer.calibration_text``; evaluation on the Python reference text (``attnzoo.eval``) and
passkey prompts, so the two never overlap. Per variant (dense, ``act``, ``echo`` with each count of
``--shared`` layers): perplexity of ``--continuation`` tokens teacher-forced after ``--context``
tokens (0: skipped), passkey at each of ``--passkey-contexts`` (4 depths x ``--trials``), and decode steps at
``--decode-context`` (0: skipped) interleaved with dense steps (one each, alternately, so both see the same
load), reported as medians and their ratio, with the prefill's peak RSS above its start. The JSON
is rewritten after every measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import attnzoo
from attnzoo import models
from attnzoo.eval import passkey
from attnzoo.eval.common import save_json
from attnzoo.eval.generation import PeakMemory, continuation_perplexity, english_ids
from attnzoo.eval.perplexity import token_ids
from attnzoo.integrations.transformers.act import act_search, act_select
from attnzoo.integrations.transformers.compress import cache_argument, cache_bytes
from attnzoo.integrations.transformers.echo import echo_search

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from any folder: the seer script sits beside this one
from distill_seer import calibration_text  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _patched(model, variant):
    """A context manager running ``variant`` ((name, config) or None for dense)."""
    return attnzoo.patch(model, variant[0], config=variant[1]) if variant else contextlib.nullcontext()


@torch.no_grad()
def decode_speed(model, ids: torch.Tensor, variant, steps: int) -> dict:
    """Median ms per decode step of ``variant`` and of dense, steps interleaved, after prefilling ``ids``."""
    name = cache_argument(model)
    runs = {"dense": None, "variant": variant}
    caches, tokens, peaks = {}, {}, {}
    for key, spec in runs.items():
        with PeakMemory() as peak, _patched(model, spec):
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        caches[key], tokens[key], peaks[key] = out.past_key_values, out.logits[:, -1:].argmax(-1), peak.above
    times = {key: [] for key in runs}
    for _ in range(steps):
        for key, spec in runs.items():
            with _patched(model, spec):
                start = time.perf_counter()
                out = model(input_ids=tokens[key], **{name: caches[key]}, use_cache=True)
                times[key].append(time.perf_counter() - start)
            tokens[key] = out.logits[:, -1:].argmax(-1)
    ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
    return {"decode_ms": ms, "ratio_to_dense": ms["variant"] / ms["dense"], "prefill_peak_rss_above_start": peaks,
            "cache_bytes": {key: cache_bytes(c) for key, c in caches.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="act_echo.json")
    p.add_argument("--calibration-tokens", type=int, default=512)
    p.add_argument("--min-gains", default="0,1", help="ACT configs: heads whose calibration gained more than this many nats")
    p.add_argument("--shared", default="4,8,12", help="numbers of echo layers, comma-separated")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--continuation", type=int, default=512)
    p.add_argument("--passkey-contexts", default="2048,4096")
    p.add_argument("--trials", type=int, default=1, help="keys per depth (4 depths)")
    p.add_argument("--decode-context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--reuse", help="a previous run's JSON: take its ACT and echo configs instead of searching again")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = models.load("smollm2-135m")
    result = {"args": vars(args), "torch_threads": torch.get_num_threads(), "variants": {}}
    calibration = token_ids(tokenizer, calibration_text())[None, :args.calibration_tokens]
    reused = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    start = time.perf_counter()
    act_config = reused.get("act_config") or act_search(model, calibration)
    result["act_search_s"] = reused.get("act_search_s", time.perf_counter() - start)
    result["act_config"] = act_config
    variants = {"dense": None}
    for gain in _floats(args.min_gains):
        variants[f"act_gain_{gain:g}"] = ("act", act_select(act_config, gain))
    for shared in _ints(args.shared):
        config = reused.get(f"echo_{shared}_config") or echo_search(model, calibration, shared)
        result[f"echo_{shared}_config"] = config
        variants[f"echo_{shared}"] = ("echo", config)
    save_json(args.out, result)
    for key, spec in variants.items():
        row = result["variants"].setdefault(key, {})
        with _patched(model, spec):
            if args.context:
                evaluation = english_ids(tokenizer, args.context + args.continuation)
                row["continuation_ppl"] = continuation_perplexity(model, evaluation, args.context, args.continuation).perplexity
                save_json(args.out, result)
            for context in _ints(args.passkey_contexts):
                found = passkey(model, tokenizer, context, n=args.trials, show_progress=False)
                row[f"passkey_{context}"] = f"{found.correct}/{len(found.trials)}"
                save_json(args.out, result)
        if spec is not None and args.decode_context:
            row["decode"] = decode_speed(model, english_ids(tokenizer, args.decode_context), spec, args.steps)
            save_json(args.out, result)
        print(key, row, flush=True)


if __name__ == "__main__":
    main()
