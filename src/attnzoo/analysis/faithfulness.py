"""Faithfulness of token attributions by deletion: replace the tokens an attribution ranks
highest, a growing fraction at a time, and follow the explained logit. A faithful attribution
makes the logit fall fast; the area under the curve (x in [0, 1]) sums it up, lower is better."""

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


@torch.no_grad()
def deletion_curve(model, input_ids: torch.Tensor, order: Sequence[int], *, target: int, position: int = -1,
                   replacement: int, steps: int = 10) -> list[float]:
    """The logit ``target`` at ``position`` of the (1, N) ``input_ids`` as the first 0, 1/steps,
    ..., all of the positions in ``order`` are replaced by the token ``replacement``; steps + 1
    values. The model runs one batch of steps + 1 rows."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InvalidArgumentError("input_ids", "a (1, N) LongTensor", tuple(input_ids.shape))
    steps = check_int("steps", steps)
    rows = input_ids.repeat(steps + 1, 1)
    for s in range(steps + 1):
        deleted = list(order)[: round(s * len(order) / steps)]
        rows[s, deleted] = replacement
    logits = model(input_ids=rows.to(next(model.parameters()).device)).logits
    logits = logits[:, position] if logits.dim() == 3 else logits
    return logits[:, target].float().cpu().tolist()


def area(curve: Sequence[float]) -> float:
    """Trapezoidal area under ``curve`` sampled at evenly spaced x in [0, 1]."""
    ys = np.asarray(curve, dtype=float)
    return float(((ys[1:] + ys[:-1]) / 2).sum() / (len(ys) - 1))
