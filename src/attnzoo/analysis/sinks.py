"""Attention sinks per layer and head, as ACT (Yu et al., ICML 2024) detects them.

ACT calls a key token a sink of a head when the attention it receives, averaged over the queries
that can see it, is far above what an even spread would give; its sinks include tokens beyond
the first one. The average runs over visible queries only, so that in causal attention a late
token (seen by few queries) is judged on the same footing as the first (seen by all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError, check_float, check_int
from ..kernels.dense import causal_mask
from ._checks import check_probs


@dataclass
class SinkMap:
    """Sinks of one layer. ``score`` (B, H, Nk): mean attention each key receives from the queries
    that see it; ``is_sink`` (B, H, Nk) bool: ``score > threshold``; ``threshold``: the bar used."""

    score: torch.Tensor
    is_sink: torch.Tensor
    threshold: float

    def positions(self, head: int, batch: int = 0) -> list[int]:
        """Key positions that are sinks of ``head`` in batch item ``batch``."""
        return torch.nonzero(self.is_sink[batch, head]).flatten().tolist()

    def head_fraction(self, position: int) -> float:
        """Fraction of (batch, head) pairs in which key ``position`` is a sink."""
        return float(self.is_sink[:, :, position].float().mean())

    def other_sinks(self) -> list[int]:
        """Key positions after the first that are a sink of at least one head, ascending."""
        return (torch.nonzero(self.is_sink[:, :, 1:].any(dim=1).any(dim=0)).flatten() + 1).tolist()


def visible_queries(nq: int, nk: int, *, causal: bool, mask: torch.Tensor | None, device=None) -> torch.Tensor:
    """(B|1, 1|H, Nk) float count of the queries that may attend each key: from ``mask`` (.., Nq, Nk)
    bool (True = attend) when given, else the bottom-right causal pattern or all Nq queries."""
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() not in (2, 4) or mask.shape[-2:] != (nq, nk):
            raise InvalidArgumentError("mask", f"a bool (Nq, Nk) or (B|1, 1|H, Nq, Nk) tensor with (Nq, Nk) = ({nq}, {nk})",
                                       f"{mask.dtype} {tuple(mask.shape)}")
        return (mask if mask.dim() == 4 else mask[None, None]).float().sum(dim=-2)
    if causal:
        return causal_mask(nq, nk, device).float().sum(dim=-2)[None, None]
    return torch.full((1, 1, nk), float(nq), device=device)


def sinks(probs: torch.Tensor, *, causal: bool, alpha: float = 5.0, threshold: float | None = None,
          mask: torch.Tensor | None = None, min_queries: int = 1) -> SinkMap:
    """Find the sinks of one layer's attention ``probs`` (B?, H, Nq, Nk).

    A key is a sink of a head when its mean received attention over visible queries exceeds
    ``threshold`` (ACT's code uses such an absolute bar); by default the bar is ``alpha / Nk``,
    ``alpha`` times the even share, so it does not depend on the length. ``causal``: the
    queries that see key j are those at or after it (bottom-right aligned); ``mask``
    (B|1, 1|H, Nq, Nk) or (Nq, Nk) bool, True = attend, overrides it (padding, windows). Keys no
    query sees score 0. ``min_queries``: keys seen by fewer queries are never sinks (ACT's mean
    lets the last causal tokens, seen by a query or two, pass on their self-attention alone; 1 keeps
    ACT's criterion). Returns a :class:`SinkMap` with a batch axis (1 for 3-d input)."""
    p = check_probs("probs", probs).float()
    nq, nk = p.shape[-2:]
    if threshold is None:
        threshold = check_float("alpha", alpha, low=0.0, high=float(nk), low_open=True) / nk
    else:
        threshold = check_float("threshold", threshold, low=0.0, high=1.0)
    counts = visible_queries(nq, nk, causal=causal, mask=mask, device=p.device)
    score = p.sum(dim=-2) / counts.clamp(min=1)
    enough = counts >= check_int("min_queries", min_queries)
    return SinkMap(score=score, is_sink=(score > threshold) & enough, threshold=threshold)
