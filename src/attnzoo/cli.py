"""The ``attnzoo`` command line: ``list`` here; each other command lives beside its package
(``bench``: attnzoo.bench.cli) and registers itself through ``add_parser``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .errors import AttnzooError

COMMAND_MODULES: tuple[str, ...] = ("attnzoo.bench.cli", "attnzoo.eval.cli", "attnzoo.distill.cli", "attnzoo.analysis.cli")


def _paper(info) -> str:
    return f"{info.title} (arXiv {info.arxiv})" if info.arxiv else info.title


def _list(args: argparse.Namespace) -> int:
    from .registry import kind

    infos = kind(args.kind).infos()
    if args.family is not None:
        infos = [i for i in infos if args.family in i.family]
    if args.json:
        print(json.dumps([i.as_dict() for i in infos], indent=2))
        return 0
    yes = lambda b: "yes" if b else "-"  # noqa: E731
    if args.kind == "methods":
        rows = [("name", "family", "causal", "non-causal", "cross", "gqa", "training-free", "time", "paper")]
        rows += [(i.name, "/".join(i.family), yes(i.causal), yes(i.non_causal), yes(i.cross), yes(i.gqa),
                  yes(i.training_free), i.time, _paper(i)) for i in infos]
    else:
        rows = [("name", "family", "summary", "paper")] + [(i.name, "/".join(i.family), i.summary, _paper(i)) for i in infos]
    if len(rows) == 1:
        print(f"no {args.kind} registered yet")
        return 0
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnzoo", description="Attention methods behind one API: list, benchmark, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list registered attention methods, cache policies or modules")
    p.add_argument("--kind", choices=("methods", "caches", "modules"), default="methods", help="what to list (default: methods)")
    p.add_argument("--family", help="only this family (local, dynamic, linear, ...)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_list)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (AttnzooError, ImportError) as e:  # bad input or a missing extra: the message, not a traceback
        print(f"attnzoo {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
