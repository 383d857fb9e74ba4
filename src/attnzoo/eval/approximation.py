"""How well a method approximates exact attention on captured q, k, v: output error and recall of
the exact attention mass on the pairs the method attends to."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kernels.dense import attention_scores, causal_mask, masked_softmax, sdpa
from ..method import Method
from ..registry import get_method
from .capture import CapturedQKV
from .common import progress


@dataclass
class LayerApproximation:
    """``rel_error``: ||out - exact|| / ||exact|| over the layer's output; ``recall``: the mean over
    queries and heads of the exact attention probability mass on the pairs the method attends to
    (None where the method has no sparse support, e.g. linear or pooled attention);
    ``recall_per_head``: the same per query head."""

    layer: int
    rel_error: float
    recall: float | None
    recall_per_head: list[float] | None


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

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mean_rel_error": self.mean_rel_error, "mean_recall": self.mean_recall}


@torch.no_grad()
def attention_recall(q: torch.Tensor, k: torch.Tensor, support: torch.Tensor, *, causal: bool, scale: float,
                     chunk: int = 256) -> torch.Tensor:
    """Per query head (Hq,): mean over batch and queries of the exact softmax mass (float64) on
    ``support`` (bool, broadcasting to (B, Hq, Nq, Nk)), ``chunk`` queries at a time."""
    Nq, Nk = q.shape[2], k.shape[2]
    allowed = causal_mask(Nq, Nk, q.device) if causal else None
    total = torch.zeros(q.shape[1], dtype=torch.float64, device=q.device)
    for start in range(0, Nq, chunk):
        rows = slice(start, min(start + chunk, Nq))
        probs = masked_softmax(attention_scores(q[:, :, rows].double(), k.double(), scale=scale),
                               None if allowed is None else allowed[rows])
        kept = support[..., rows, :] if support.shape[-2] == Nq else support
        total += (probs * kept).sum(dim=(-1, -2)).sum(0)
    return total / (q.shape[0] * Nq)


def approximation(method: str | Method, captured: Mapping[int, CapturedQKV], *, chunk: int = 256, show_progress: bool = True,
                  on_layer: Callable[[ApproximationResult], None] | None = None, **config: Any) -> ApproximationResult:
    """Run ``method`` (a name configured by ``config``, or a Method) on each captured layer and compare
    with exact attention. ``on_layer`` sees the partial result after every layer."""
    m = method if isinstance(method, Method) else get_method(method, **config)
    options = {f.name: getattr(m.config, f.name) for f in dataclasses.fields(m.config)}
    tokens = next(iter(captured.values())).q.shape[2] if captured else 0
    result = ApproximationResult(m.info.name, options, tokens)
    for layer, c in progress(sorted(captured.items()), f"approximation {m.info.name}", show_progress):
        exact = sdpa(c.q, c.k, c.v, causal=c.causal, scale=c.scale)
        out = m(c.q, c.k, c.v, causal=c.causal, scale=c.scale)
        rel = float((out.double() - exact.double()).norm() / exact.double().norm().clamp_min(1e-30))
        support = m.support(c.q, c.k, c.v, causal=c.causal, scale=c.scale)
        per_head = None if support is None else attention_recall(c.q, c.k, support, causal=c.causal, scale=c.scale, chunk=chunk).tolist()
        recall = None if per_head is None else sum(per_head) / len(per_head)
        result.layers.append(LayerApproximation(layer, rel, recall, per_head))
        if on_layer is not None:
            on_layer(result)
    return result
