"""``attnzoo analyze``: one analysis tool on one real model and one text; pictures, a page and JSON.

    attnzoo analyze --model smollm2-135m --text prompt.txt --tool sinks --out analysis-out

Every tool writes ``<tool>.json`` and, where it has one, a picture (PNG, with matplotlib) and an
offline HTML page into ``--out``. ``--method`` (with ``--set``) patches the model first, so the
tools read what that method keeps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..models import MODELS
from ..progress import progress

TOOLS = ("record", "sinks", "head_similarity", "rollout", "flow", "vlsam_flow", "lrp", "sr_map", "gradient", "rank",
         "token_importance", "verbalize", "normgrad")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="read a real model's attention: sinks, rollout, flow, AttnLRP, rank, ... with pictures",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
    p.add_argument("--text", required=True, help="a UTF-8 text file (the input)")
    p.add_argument("--tool", choices=TOOLS, required=True)
    p.add_argument("--out", default="attnzoo-analysis", help="folder for JSON, PNG and HTML")
    p.add_argument("--method", default=None, help="patch the model with this registered method first")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method option, JSON value (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except OSError as e:  # an unreadable --text file or unwritable --out (attnzoo.cli.main reports the rest)
        print(f"attnzoo analyze: {e}", file=sys.stderr)
        return 2


def _pictures_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("attnzoo analyze: PNG pictures need matplotlib: pip install 'attnzoo[report]' (JSON and HTML still written)", file=sys.stderr)
        return False
    return True


def _run(args: argparse.Namespace) -> int:
    from .. import models
    from ..eval.cli import parse_settings
    from ..integrations.transformers import patch, unpatch
    from ..registry import get_method

    text = Path(args.text).read_text(encoding="utf-8").strip()  # no trailing newline token to explain
    method = get_method(args.method, **parse_settings(args.set)) if args.method else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = models.load(args.model)
    if method is not None:
        patch(model, method)
    try:
        summary = analyze(model, tokenizer, text, args.tool, out, show_progress=not args.no_progress, pictures=_pictures_available())
    finally:
        unpatch(model)
    summary.update(model=args.model, method=args.method, tool=args.tool)
    (out / f"{args.tool}.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict))}, indent=2))
    print(f"saved {out}", file=sys.stderr)
    return 0


def _token_scores(tokens, scores: torch.Tensor) -> list[dict[str, Any]]:
    return [{"token": t, "score": round(float(s), 6)} for t, s in zip(tokens, scores)]


def analyze(model, tokenizer, text: str, tool: str, out: Path, *, show_progress: bool = True, pictures: bool = True) -> dict[str, Any]:
    """Run ``tool`` (one of :data:`TOOLS`) on ``text`` and write its files into ``out``; returns the JSON summary."""
    from . import html
    from . import pictures as png
    from .faithfulness import deletion_order
    from .flow import attention_flow, regularized_flow, rollout
    from .lrp import lrp
    from .normgrad import normgrad
    from .rank import rank
    from .record import record
    from .similarity import layer_similarity
    from .sinks import sinks
    from .sr_map import sr_map
    from .token_importance import token_importance
    from .verbalize import verbalize

    special = list(getattr(tokenizer, "all_special_tokens", []))
    if tool in ("lrp", "sr_map", "gradient", "verbalize"):
        rel = lrp(model, text, tokenizer=tokenizer, rule="gradient" if tool == "gradient" else "attnlrp")
        tokens, scores = rel.token_strings[0], rel.tokens[0]
        if tool == "sr_map":
            scores = sr_map(scores[None])[0]
        summary = {"target": tokenizer.decode([int(rel.target[0])]).strip(), "logit": float(rel.logit[0]),
                   "relevance_sum": float(rel.tokens[0].sum()), "block_totals": rel.layers[0].tolist(),
                   "top_tokens": [tokens[i] for i in deletion_order(scores)[:5]]}
        if tool == "verbalize":
            summary["text"] = verbalize(tokens, scores, prediction=summary["target"], skip=special)
            (out / "verbalize.txt").write_text(summary["text"] + "\n", encoding="utf-8")
        summary["tokens"] = _token_scores(tokens, scores)
        html.tokens_html(tokens, scores, out / f"{tool}.html", title=f"{tool}: next token {summary['target']!r}",
                         caption=summary.get("text", ""))
        if pictures:
            png.relevance_png(scores, out / f"{tool}.png", tokens=tokens, title=f"{tool} for {summary['target']!r}")
        return summary
    if tool == "normgrad":
        from .lrp import transformer_blocks

        ids = tokenizer(text, return_tensors="pt")
        names = {id(m): n for n, m in model.named_modules()}
        last = names[id(transformer_blocks(model)[-1])]
        scores = normgrad(model, dict(ids), [last])[last][0]
        tokens = tokenizer.convert_ids_to_tokens(ids["input_ids"][0].tolist())
        html.tokens_html(tokens, scores, out / "normgrad.html", title=f"NormGrad at {last}")
        if pictures:
            png.relevance_png(scores, out / "normgrad.png", tokens=tokens, title=f"NormGrad at {last}")
        return {"layer": last, "tokens": _token_scores(tokens, scores)}
    rec = record(model, text, tokenizer=tokenizer, qkv=tool == "rank")
    tokens = rec.tokens[0]
    n = len(tokens)
    html.attention_html(rec.probs, tokens, out / "attention.html", layers=rec.layers, title=f"attention: {text[:60]!r}")
    if tool == "record":
        if pictures:
            png.attention_png(rec.probs[-1][0, 0], out / "record.png", tokens=tokens, title=f"layer {rec.layers[-1]}, head 0")
        return {"layers": rec.layers, "heads": rec.probs[0].shape[1], "tokens": tokens}
    if tool == "sinks":
        per_layer = []
        for layer, probs in progress(list(zip(rec.layers, rec.probs)), "sinks", enabled=show_progress):
            found = sinks(probs, causal=rec.causal, min_queries=min(4, n))
            per_layer.append({"layer": layer, "first_token_heads": found.head_fraction(0),
                              "other_sinks": [{"position": p, "token": tokens[p], "heads": found.head_fraction(p)} for p in found.other_sinks()]})
        return {"threshold": f"5 / {n}", "min_queries": min(4, n), "layers": per_layer}
    if tool == "head_similarity":
        sim = layer_similarity(rec.probs)
        if pictures:
            png.grid_png(sim, out / "head_similarity.png", title="layer similarity (cosine, same head)")
        return {"layers": rec.layers, "layer_similarity": sim.tolist()}
    if tool == "rank":
        rows = [{"layer": i, **rank(q, k, v, causal=rec.causal).summary()}
                for i, q, k, v in progress(list(zip(rec.layers, rec.q, rec.k, rec.v)), "rank", enabled=show_progress)]
        return {"layers": rows}
    if tool == "token_importance":
        scores = token_importance(rec.probs)[0]
    elif tool == "rollout":
        scores = rollout(rec.probs)[0, -1]
    elif tool == "vlsam_flow":
        scores = regularized_flow(rec.probs)[0, -1]
    else:  # flow: one max-flow per input token, from the last token
        scores = attention_flow(rec.probs, outputs=[n - 1], show_progress=show_progress)[0, 0]
    html.tokens_html(tokens, scores, out / f"{tool}.html", title=f"{tool} of the last token")
    if pictures:
        png.relevance_png(scores, out / f"{tool}.png", tokens=tokens, title=f"{tool} of the last token")
    return {"tokens": _token_scores(tokens, scores)}
