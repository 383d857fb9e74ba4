"""Hedgehog: a learnable, softmax-mimicking MLP feature map, fitted to a teacher's attention."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...method import MethodInfo
from ...registry import register
from .base import LearnedFeatureMethod, LearnedMapConfig
from .maps import HedgehogFeatureMap


@dataclass
class HedgehogConfig(LearnedMapConfig):
    """``width``: the F features per sign of a new :class:`~attnzoo.methods.learned.maps.HedgehogFeatureMap`
    (default: head dim). The trained map itself is state, not config: pass ``feature_map=`` to the
    constructor, or let ``method.fit(q, k)`` train one on sample queries/keys; without one an
    untrained map (W = I) runs."""


@register
class Hedgehog(LearnedFeatureMethod):
    """Hedgehog ("The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry",
    arXiv 2402.04347): normalised linear attention with the learnable feature map ``[softmax(xW + b),
    softmax(-xW - b)]`` per head (queries and keys separately), trained so its attention weights
    match softmax attention (``fit``). q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv) -> (B, Hq, Nq, Dv);
    ``scale`` is only used by ``fit``'s teacher."""

    info = MethodInfo(
        name="hedgehog", title="The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry",
        arxiv="2402.04347", family=("linear", "learned"), causal=True, non_causal=True, cross=True, gqa=True,
        training_free=False, time="O(N F (D + Dv))", memory="O(N (F + Dv))",
        summary="learnable spiky/monotone MLP feature map distilled from softmax attention weights",
    )
    map_type = HedgehogFeatureMap
    Config = HedgehogConfig

    def new_map(self, heads: int, dim: int) -> nn.Module:
        return HedgehogFeatureMap(heads, dim, self.config.width)
