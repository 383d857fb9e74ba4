"""Per-head decay factors of linear attention with decay (Lightning Attention's ALiBi-style rates)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import InvalidArgumentError, UnsupportedError
from ...method import Call


def alibi_decay(heads: int) -> torch.Tensor:
    """TransNormerLLM / Lightning per-head decay ``lambda_h = exp(-2^(-8 (h+1) / H))``."""
    return torch.exp(-(2.0 ** (-8.0 * torch.arange(1, heads + 1, dtype=torch.float64) / heads))).float()


def check_decay(value):
    """Config check for ``decay``: None, ``"alibi"``, one factor or one per query head, in (0, 1]."""
    if value is None or value == "alibi":
        return value
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if not values or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not (0 < x <= 1) for x in values):
        raise InvalidArgumentError("decay", "None, 'alibi', a factor in (0, 1] or one per head", repr(value))
    return tuple(float(x) for x in values) if len(values) > 1 else float(values[0])


def decay_for(value, call: Call) -> torch.Tensor | None:
    """The (Hq,) decay tensor of a checked ``decay`` setting (None: no decay)."""
    if value is None:
        return None
    if not call.causal:
        raise UnsupportedError("decay needs causal=True (the decay lambda^(i-j) is defined for keys j <= i)")
    if value == "alibi":
        return alibi_decay(call.heads_q)
    if isinstance(value, tuple):
        if len(value) != call.heads_q:
            raise InvalidArgumentError("decay", f"one factor per query head ({call.heads_q})", f"{len(value)} factors")
        return torch.tensor(value)
    return torch.full((call.heads_q,), value)
