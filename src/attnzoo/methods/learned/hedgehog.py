"""Hedgehog: a learnable, softmax-mimicking MLP feature map, fitted to a teacher's attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from attnzoo.methods.learned.maps import HedgehogFeatureMap

from ...method import MethodInfo
from ...registry import register
from .base import LearnedFeatureMethod, LearnedMapConfig


@dataclass
class HedgehogConfig(LearnedMapConfig):
    """``feature_map``: a trained :class:`~attnzoo.kernels.linear.feature_maps.HedgehogFeatureMap`
    (one per layer; get one with ``method.fit(q, k)`` on sample queries/keys, or build and train it
    yourself); None uses an untrained map (W = I). ``width``: its F features per sign (default: head dim)."""

    map_type: ClassVar[type] = HedgehogFeatureMap


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
    Config = HedgehogConfig

    def new_map(self, heads: int, dim: int) -> nn.Module:
        return HedgehogFeatureMap(heads, dim, self.config.width)
