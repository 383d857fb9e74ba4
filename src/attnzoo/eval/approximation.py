"""How well a method approximates exact attention on captured q, k, v: output error and recall of
the exact attention mass on the pairs the method attends to."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import check_float, check_int
from ..kernels.dense import (
    causal_mask,
    exact_probabilities,
    sdpa,
)
from ..method import Method
from ..progress import progress
from ..registry import get_method
from .capture import CapturedQKV


@dataclass
class LayerApproximation:
    """``rel_error``: ||out - exact|| / ||exact|| over the layer's output; ``recall``: the mean over
    queries and heads of the exact attention probability mass on the pairs the method attends to
    (None where the method has no sparse support, e.g. linear or pooled attention);
    ``recall_per_head``: the same per query head; ``density``: the fraction of allowed pairs in the
    support; ``bound``: with ``approximation(bound=True)``, the most mass any support of that
    density keeps (:func:`oracle_recall`, single entries)."""

    layer: int
    rel_error: float
    recall: float | None
    recall_per_head: list[float] | None
    density: float | None = None
    bound: float | None = None


@dataclass
class ApproximationResult:
    method: str
    config: dict[str, Any]
    tokens: int
    layers: list[LayerApproximation] = field(default_factory=list)

    @property
    def mean_rel_error(self) -> float:
        return sum(r.rel_error for r in self.layers) / len(self.layers) if self.layers else float("nan")

    @property
    def mean_recall(self) -> float | None:
        values = [r.recall for r in self.layers if r.recall is not None]
        return sum(values) / len(values) if values else None

    @property
    def mean_bound(self) -> float | None:
        values = [r.bound for r in self.layers if r.bound is not None]
        return sum(values) / len(values) if values else None

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mean_rel_error": self.mean_rel_error, "mean_recall": self.mean_recall,
                "mean_bound": self.mean_bound}


@torch.no_grad()
def attention_recall(q: torch.Tensor, k: torch.Tensor, support: torch.Tensor, *, causal: bool, scale: float,
                     chunk: int = 256) -> torch.Tensor:
    """Per query head (Hq,): mean over batch and queries of the exact softmax mass (float64) on
    ``support`` (bool, broadcasting to (B, Hq, Nq, Nk)), ``chunk`` queries at a time."""
    Nq = q.shape[2]
    total = torch.zeros(q.shape[1], dtype=torch.float64, device=q.device)
    for rows, probs in exact_probabilities(q, k, causal=causal, scale=scale, chunk=chunk, dtype=torch.float64):
        kept = support[..., rows, :] if support.shape[-2] == Nq else support
        total += (probs * kept).sum(dim=(-1, -2)).sum(0)
    return total / (q.shape[0] * Nq)


def approximation(method: str | Method, captured: Mapping[int, CapturedQKV], *, chunk: int = 256, show_progress: bool = True,
                  on_layer: Callable[[ApproximationResult], None] | None = None, bound: bool = False,
                  **config: Any) -> ApproximationResult:
    """Run ``method`` (a name configured by ``config``, or a Method) on each captured layer and compare
    with exact attention. ``bound``: also the most mass any support of the method's density keeps
    on that layer (one head's Nq x Nk probabilities at a time). ``on_layer`` sees the partial
    result after every layer."""
    m = method if isinstance(method, Method) else get_method(method, **config)
    options = {f.name: getattr(m.config, f.name) for f in dataclasses.fields(m.config)}
    tokens = next(iter(captured.values())).q.shape[2] if captured else 0
    result = ApproximationResult(m.info.name, options, tokens)
    for layer, c in progress(sorted(captured.items()), f"approximation {m.info.name}", show_progress):
        exact = sdpa(c.q, c.k, c.v, causal=c.causal, scale=c.scale)
        out = m(c.q, c.k, c.v, causal=c.causal, scale=c.scale)
        rel = float((out.double() - exact.double()).norm() / exact.double().norm().clamp_min(1e-30))
        support = m.support(c.q, c.k, c.v, causal=c.causal, scale=c.scale)
        per_head = density = best = None
        if support is not None:
            per_head = attention_recall(c.q, c.k, support, causal=c.causal, scale=c.scale, chunk=chunk).tolist()
            allowed = causal_mask(*support.shape[-2:], support.device) if c.causal else torch.ones_like(support[0, 0])
            full = support.expand(c.q.shape[0], c.q.shape[1], -1, -1)
            density = float((full & allowed).sum()) / (float(allowed.sum()) * c.q.shape[0] * c.q.shape[1])
            if bound and density > 0:
                best = float(oracle_recall(c.q, c.k, causal=c.causal, scale=c.scale, density=density, chunk=chunk).mean())
        recall = None if per_head is None else sum(per_head) / len(per_head)
        result.layers.append(LayerApproximation(layer, rel, recall, per_head, density, best))
        if on_layer is not None:
            on_layer(result)
    return result


def _tiles(x: torch.Tensor, b: int) -> torch.Tensor:
    """(..., Nq, Nk) -> (..., ceil(Nq / b), ceil(Nk / b)): sums over b x b tiles, zero-padded."""
    nq, nk = x.shape[-2:]
    x = F.pad(x, (0, -nk % b, 0, -nq % b))
    return x.unflatten(-1, (-1, b)).unflatten(-3, (-1, b)).sum((-3, -1))


@torch.no_grad()
def oracle_recall(q: torch.Tensor, k: torch.Tensor, *, causal: bool, scale: float, density: float,
                  block_size: int | None = None, chunk: int = 256) -> torch.Tensor:
    """Per query head (Hq,): the most exact attention mass any support of ``density`` keeps, the
    bound a content-selected method is measured against. ``block_size`` b: supports made of whole
    b x b tiles, picked per head greedily by mass per allowed entry (no selection with b-token
    blocks does better, up to one tile of slack); None: any (query, key) pairs (each head's top
    entries). ``density``: the fraction of allowed pairs (the causal triangle when ``causal``).
    q (B, Hq, Nq, D), k (B, Hkv, Nk, D). Without ``block_size`` it holds one head's B Nq Nk
    probabilities at a time: for a few thousand tokens."""
    density = check_float("density", density, low=0.0, high=1.0, low_open=True)
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    allowed = causal_mask(Nq, Nk, q.device) if causal else torch.ones(Nq, Nk, dtype=torch.bool, device=q.device)
    budget = density * float(allowed.sum())
    if block_size is None:  # one query head at a time: its allowed probabilities, then their top entries
        G = Hq // k.shape[1]
        kept = torch.stack([
            torch.cat([p[..., allowed[rows]] for rows, p in exact_probabilities(q[:, h : h + 1], k[:, h // G : h // G + 1], causal=causal, scale=scale,
                                                                        chunk=chunk, dtype=torch.float64)], -1)
            .topk(int(budget), dim=-1).values.sum(-1)[:, 0]
            for h in range(Hq)
        ], 1)
    else:
        b = check_int("block_size", block_size)
        area = _tiles(allowed.double(), b).flatten()  # allowed entries per tile
        rows_at_once = max(b, chunk // b * b)  # whole query blocks per chunk
        mass = torch.cat([_tiles(p, b) for _, p in exact_probabilities(q, k, causal=causal, scale=scale, chunk=rows_at_once,
                                                                           dtype=torch.float64)], dim=2).flatten(2)
        order = (mass / area.clamp(min=1)).masked_fill(area == 0, -1.0).argsort(-1, descending=True)
        fits = area[order].cumsum(-1) <= budget
        kept = (mass.gather(-1, order) * fits).sum(-1)
    return kept.sum(0).cpu() / (B * Nq)
