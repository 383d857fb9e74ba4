"""``attnzoo eval``: one method on one real model and one task; a table on screen, JSON on disk.

    attnzoo eval --model smollm2-135m --method streaming --set window=1024 --task passkey --context 4096
    attnzoo eval --cache snapkv --set ratio=0.25 --task cost --context 7168

With ``--cache NAME`` the run measures a KV-cache policy (``attnzoo.compress``; ``--set`` takes
its options and ratio / budget / interval / chunk) against the dense cache in the same run:
``passkey`` generates under it, ``ppl`` is the perplexity of a ``--continuation`` teacher-forced
after a compressed ``--context``, ``cost`` the cache bytes, peak memory, prefill time and decode
milliseconds per token.

The JSON file (``--out`` folder, default ``attnzoo-results/``) is rewritten after every trial or
layer, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from ..models import MODELS

TASKS = ("ppl", "passkey", "approx", "cost")
COMPRESS_OPTIONS = ("ratio", "budget", "interval", "chunk")


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``["window=1024", "spans=[512,1024]"]`` -> {"window": 1024, "spans": [512, 1024]} (JSON values, else strings)."""
    config = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgumentError("--set", "key=value", repr(pair))
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return config


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="measure a method on a real pretrained model (perplexity, passkey, approximation)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS), help="smollm2-135m (decoder) or minilm-l6 (encoder: --task approx only)")
    p.add_argument("--method", default=None, help="registered method name (attnzoo list); with --cache: the prefill method, optional")
    p.add_argument("--cache", default=None, help="KV-cache policy name (attnzoo list --kind caches): compare it with the dense cache")
    p.add_argument("--method-set", action="append", default=[], metavar="KEY=VALUE", help="with --cache: options of --method")
    p.add_argument("--continuation", type=int, default=512, help="--cache ppl: continuation tokens scored after the context")
    p.add_argument("--new", type=int, default=32, help="--cache cost: decode steps timed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method option, JSON value (repeatable)")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--context", type=int, default=4096, help="tokens per window / prompt / capture")
    p.add_argument("--depths", type=_floats, default=[0.1, 0.35, 0.65, 0.9], help="passkey depths, comma-separated")
    p.add_argument("--n", type=int, default=1, help="passkey trials per depth")
    p.add_argument("--windows", type=int, default=1, help="perplexity windows")
    p.add_argument("--layers", type=_ints, default=None, help="approx: layers to capture, comma-separated (default all)")
    p.add_argument("--decode", choices=("auto", "exact", "method"), default="auto", help="how decode steps attend (passkey)")
    p.add_argument("--bound", action="store_true", help="approx: also the most attention mass any support of the method's density keeps")
    p.add_argument("--out", default="attnzoo-results", help="folder for the JSON result")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _table(task: str, result: dict[str, Any]) -> list[tuple[str, ...]]:
    if task == "ppl":
        return [("context", "tokens", "nll", "perplexity"),
                (str(result["context_len"]), str(result["tokens"]), f"{result['nll']:.4f}", f"{result['perplexity']:.3f}")]
    if task == "passkey":
        rows = [("depth", "tokens", "key at", "key", "answer", "correct")]
        rows += [(f"{t['depth']:.2f}", str(t["tokens"]), str(t["key_position"]), t["key"], t["answer"][:20], "yes" if t["correct"] else "no")
                 for t in result["trials"]]
        return rows + [("accuracy", "", "", "", "", f"{result['correct']}/{len(result['trials'])}")]
    number = lambda x, spec: "n/a" if x is None else format(x, spec)  # noqa: E731
    rows = [("layer", "rel. error", "density", "recall of attention mass", "bound at that density")]
    rows += [(str(r["layer"]), f"{r['rel_error']:.4g}", number(r["density"], ".4f"), number(r["recall"], ".4f"), number(r["bound"], ".4f"))
             for r in result["layers"]]
    densities = [r["density"] for r in result["layers"] if r["density"] is not None]
    density = sum(densities) / len(densities) if densities else None
    return rows + [("mean", f"{result['mean_rel_error']:.4g}", number(density, ".4f"), number(result["mean_recall"], ".4f"),
                    number(result["mean_bound"], ".4f"))]


def _cache_table(task: str, result: dict[str, Any]) -> list[tuple[str, ...]]:
    if task == "passkey":
        return [("cache", "correct")] + [(name, f"{r['correct']}/{len(r['trials'])}") for name, r in result.items()]
    if task == "ppl":
        return [("cache", "context", "continuation", "perplexity")] + [
            (name, str(r["context"]), str(r["continuation"]), f"{r['perplexity']:.3f}") for name, r in result.items()]
    return [("cache", "KV bytes", "peak RSS MB", "prefill s", "decode ms/token")] + [
        (name, str(r["final_cache_bytes"]), f"{r['peak_rss_bytes'] / 2**20:.0f}", f"{r['prefill_s']:.2f}", f"{r['decode_ms']:.1f}")
        for name, r in result.items()]


def _run_cache(args: argparse.Namespace) -> int:
    """``--cache``: the dense cache, then the policy, on the same inputs; one JSON with both."""
    from .. import models
    from ..integrations.transformers import patch
    from ..integrations.transformers.compress import compress
    from .common import save_json
    from .generation import continuation_perplexity, english_ids, generation_cost
    from .passkey import passkey

    if args.task == "approx":
        raise InvalidArgumentError("--task", "passkey, ppl or cost with --cache", "approx")
    settings = parse_settings(args.set)
    options = {k: settings.pop(k) for k in COMPRESS_OPTIONS if k in settings}
    method_config = parse_settings(args.method_set)
    model, tokenizer = models.load(args.model)
    compress(model, args.cache, **options, **settings).close()  # bad names and options fail before any run
    path = Path(args.out) / f"eval_{args.model}_cache_{args.cache}_{args.task}_{args.context}.json"
    record: dict[str, Any] = {"model": args.model, "cache": args.cache, "options": options, "config": settings, "method": args.method,
                              "method_config": method_config, "task": args.task, "context": args.context, "status": "running", "result": {}}
    show = not args.no_progress

    def measure() -> dict[str, Any]:
        if args.task == "passkey":
            return passkey(model, tokenizer, args.context, args.depths, args.n, show_progress=show).as_dict()
        if args.task == "ppl":
            ids = english_ids(tokenizer, args.context + args.continuation)
            return continuation_perplexity(model, ids, args.context, args.continuation).as_dict()
        return generation_cost(model, english_ids(tokenizer, args.context), args.new).as_dict()

    handle = patch(model, args.method, **method_config) if args.method else None
    try:
        record["result"]["dense"] = measure()
        save_json(path, record)
        with compress(model, args.cache, **options, **settings):
            record["result"][args.cache] = measure()
    finally:
        if handle is not None:
            handle.__exit__()
    record["status"] = "done"
    save_json(path, record)
    _print_table(_cache_table(args.task, record["result"]))
    print(f"saved {path}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.cache is not None:
        return _run_cache(args)
    if args.method is None:
        raise InvalidArgumentError("--method", "a registered method name (or --cache NAME)", None)
    if args.task == "cost":
        raise InvalidArgumentError("--task", "ppl, passkey or approx without --cache (cost measures a cache policy)", "cost")
    from .. import models
    from ..integrations.transformers import patch
    from ..registry import get_method
    from .approximation import approximation
    from .capture import capture_qkv
    from .common import save_json
    from .passkey import passkey
    from .perplexity import perplexity

    config = parse_settings(args.set)
    method = get_method(args.method, **config)  # bad names and options fail before the model loads
    path = Path(args.out) / f"eval_{args.model}_{args.method}_{args.task}_{args.context}.json"
    record: dict[str, Any] = {"model": args.model, "method": args.method, "config": config, "task": args.task,
                              "context": args.context, "status": "running"}
    show = not args.no_progress

    def save(partial) -> None:
        record["result"] = partial.as_dict()
        save_json(path, record)

    model, tokenizer = models.load(args.model)
    print(f"{args.model}: {args.method} {config or ''} -> {path}", file=sys.stderr)
    try:
        if args.task == "approx":
            captured = capture_qkv(model, tokenizer, layers=args.layers, max_tokens=args.context)
            result = approximation(method, captured, show_progress=show, on_layer=save, bound=args.bound)
        else:
            with patch(model, method, decode=args.decode):
                if args.task == "ppl":
                    result = perplexity(model, tokenizer, context_len=args.context, windows=args.windows, show_progress=show)
                else:
                    result = passkey(model, tokenizer, args.context, args.depths, args.n, show_progress=show, on_trial=save)
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        save_json(path, record)
        raise
    record["status"] = "done"
    save(result)
    _print_table(_table(args.task, record["result"]))
    print(f"saved {path}", file=sys.stderr)
    return 0
