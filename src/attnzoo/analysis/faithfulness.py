"""Faithfulness of token attributions by deletion: replace the tokens an attribution ranks
highest, a growing fraction at a time, and follow the explained logit (or log-probability). A
faithful attribution makes it fall fast; the area under the curve (x in [0, 1]) sums it up, lower
is better."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InvalidArgumentError, check_int


def deletion_order(scores: torch.Tensor, *, keep: Sequence[int] = ()) -> list[int]:
    """Positions of (N,) ``scores``, highest first (ties by position), never listing ``keep``."""
    if scores.dim() != 1:
        raise InvalidArgumentError("scores", "a (N,) tensor", tuple(scores.shape))
    kept = set(keep)
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return [i for i in order if i not in kept]


VALUES = ("logit", "log_prob")


@torch.no_grad()
def deletion_curve(model, input_ids: torch.Tensor, order: Sequence[int], *, target: int, position: int = -1,
                   replacement: int | None = None, steps: int = 10, value: str = "logit") -> list[float]:
    """The ``value`` (``"logit"`` or ``"log_prob"``) of token ``target`` at ``position`` of the
    (1, N) ``input_ids`` as the first 0, 1/steps, ..., all of the positions in ``order`` are
    deleted: removed from the input (``replacement`` None; ``position`` then counts from the end
    and must be negative) or overwritten with the token ``replacement``. steps + 1 values."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InvalidArgumentError("input_ids", "a (1, N) LongTensor", tuple(input_ids.shape))
    if value not in VALUES:
        raise InvalidArgumentError("value", f"one of {VALUES}", repr(value))
    if replacement is None and position >= 0:
        raise InvalidArgumentError("position", "a position counted from the end (negative) when tokens are removed", position)
    steps = check_int("steps", steps)
    device = next(model.parameters()).device
    out = []
    for s in range(steps + 1):
        deleted = list(order)[: round(s * len(order) / steps)]
        row = input_ids[0].clone()
        if replacement is None:
            keep = torch.ones(len(row), dtype=torch.bool)
            keep[deleted] = False
            row = row[keep]
        else:
            row[deleted] = replacement
        logits = model(input_ids=row[None].to(device)).logits
        logits = (logits[0, position] if logits.dim() == 3 else logits[0]).float()
        out.append(float((logits.log_softmax(-1) if value == "log_prob" else logits)[target]))
    return out


def deletion_area(curve: Sequence[float]) -> float:
    """Trapezoidal area under ``curve`` sampled at evenly spaced x in [0, 1]."""
    ys = np.asarray(curve, dtype=float)
    return float(((ys[1:] + ys[:-1]) / 2).sum() / (len(ys) - 1))
