"""The ``attnzoo`` command line: ``list`` here; each other command lives beside its package
(``bench``: attnzoo.bench.cli) and registers itself through ``add_parser``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

COMMAND_MODULES: tuple[str, ...] = ("attnzoo.bench.cli", "attnzoo.eval.cli")


def _list(args: argparse.Namespace) -> int:
    from .registry import list_methods

    infos = list_methods(args.family)
    if args.json:
        print(json.dumps([i.as_dict() for i in infos], indent=2))
        return 0
    rows = [("name", "family", "causal", "non-causal", "cross", "gqa", "training-free", "time", "paper")]
    for i in infos:
        yes = lambda b: "yes" if b else "-"  # noqa: E731
        rows.append((i.name, "/".join(i.family), yes(i.causal), yes(i.non_causal), yes(i.cross), yes(i.gqa),
                     yes(i.training_free), i.time, f"{i.title} (arXiv {i.arxiv})" if i.arxiv else i.title))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnzoo", description="Attention methods behind one API: list, benchmark, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list registered attention methods")
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
