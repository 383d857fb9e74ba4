"""``attnzoo distill``: train a learned method against a frozen real model; resume by running it again.

    attnzoo distill --model smollm2-135m --method seer --data calib.txt --steps 300 --out runs/seer --layers 0,1,2
    attnzoo distill --model vit-digits --method linfusion --data digits --steps 200 --out runs/linfusion

``--data``: a UTF-8 text file for language models (its last ``--val-fraction`` of tokens is the held-out
validation text), or for image models ``digits`` (the train / val splits of :mod:`attnzoo.trained.digits`)
or a ``.pt`` file holding a tensor of inputs (one example per row).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import InvalidArgumentError
from ..eval.cli import parse_settings
from .harness import check_text, text_examples
from .recipes import RECIPES


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_parser(subparsers) -> None:
    from ..models import MODELS
    from ..trained import TRAINED

    p = subparsers.add_parser("distill", help="train a learned method (gate, feature map, ...) against a frozen model",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, choices=sorted([*MODELS, *TRAINED]))
    p.add_argument("--method", required=True, choices=sorted(RECIPES), help="the recipe, named after the method it trains")
    p.add_argument("--data", required=True, help="text file (language models); 'digits' or a .pt tensor file (image models)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True, help="checkpoint folder (an existing one of the same run resumes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method option, JSON value (repeatable)")
    p.add_argument("--layers", type=_ints, default=None, help="attention layers to train, comma-separated (default all)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training example (text)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out for validation")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="keep the teacher's features here for runs on the same data and method config (seer)")
    p.set_defaults(func=run)


def read_text(data: str) -> str:
    """The text of ``--data`` for a language model: an existing, non-empty UTF-8 file."""
    if not Path(data).is_file():
        raise InvalidArgumentError("--data", "an existing UTF-8 text file", repr(data))
    return check_text(Path(data).read_text(encoding="utf-8"))


def load_examples(model, processor, data: str, seq_len: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(train, val) examples for ``model`` from ``--data`` (see the module docstring)."""
    from ..integrations.attnzoo_nn import is_attnzoo_model

    if is_attnzoo_model(model):
        if data == "digits":
            from ..trained import digits

            size = getattr(getattr(model, "config", None), "image_size", 32)
            return digits.load_split("train", size)[0], digits.load_split("val", size)[0]
        if not Path(data).is_file():
            raise InvalidArgumentError("--data", "'digits' or an existing .pt file holding a tensor of model inputs", repr(data))
        examples = torch.load(data, map_location="cpu", weights_only=True)
        if not isinstance(examples, torch.Tensor):
            raise InvalidArgumentError("--data", "a .pt file holding one tensor (one example per row)", type(examples).__name__)
        cut = max(1, round(len(examples) * (1 - val_fraction)))
        return examples[:cut], examples[cut:] if cut < len(examples) else None
    return text_examples(processor, read_text(data), seq_len, val_fraction=val_fraction)


def run(args: argparse.Namespace) -> int:
    from .. import models
    from .harness import distill

    config = parse_settings(args.set)
    if args.steps < 1:  # bad input fails before the model loads
        raise InvalidArgumentError("--steps", "an integer >= 1", args.steps)
    if args.model in models.MODELS:
        read_text(args.data)
    model, processor = models.load(args.model)
    train, val = load_examples(model, processor, args.data, args.seq_len, args.val_fraction)
    run = distill(model, args.method, train, args.out, steps=args.steps, val=val, layers=args.layers, batch_size=args.batch_size,
                  lr=args.lr, seed=args.seed, save_every=args.save_every, val_every=args.val_every, progress=not args.no_progress,
                  cache_teacher=args.teacher_cache, **config)
    last = run.metrics[-1] if run.metrics else {}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float))
    print(f"{args.method} on {args.model}: step {run.steps}/{args.steps} ({shown}); load with "
          f"attnzoo.patch(model, {args.method!r}, weights={str(run.folder)!r})")
    return 0
