"""Performer: FAVOR+ positive orthogonal random features for the softmax kernel."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import check_int
from ...kernels.linear.feature_maps import favor_features, orthogonal_gaussian
from ...method import Call, MethodInfo
from ...registry import register
from . import naive
from .base import LinearConfig, LinearMethod


@dataclass
class PerformerConfig(LinearConfig):
    """``num_features``: random features M (more: closer to softmax); ``seed``: the projection
    draw (fixed, so repeated calls agree; change it to redraw). ``eps`` defaults to 0: the features
    are stabilised by a per-query factor, so an absolute eps would bias rows."""

    eps: float = 0.0
    num_features: int = 256
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.num_features = check_int("num_features", self.num_features)
        self.seed = check_int("seed", self.seed, minimum=0)


@register
class Performer(LinearMethod):
    """Performer / FAVOR+ ("Rethinking Attention with Performers", arXiv 2009.14794): softmax
    attention estimated with positive orthogonal random features ``phi(x) = exp(w x - |x|^2/2) /
    sqrt(M)`` of ``x * scale^(1/2)``, so ``E[phi(q) phi(k)] = exp(q k * scale)``; normalised linear
    attention on the shared executors. q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv) -> (B, Hq, Nq, Dv)."""

    info = MethodInfo(
        name="performer", title="Rethinking Attention with Performers", arxiv="2009.14794", family=("linear",),
        causal=True, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(N M (D + Dv))", memory="O(N (M + Dv))",
        summary="FAVOR+: positive orthogonal random features of the softmax kernel",
    )
    Config = PerformerConfig

    def __init__(self, **config):
        super().__init__(**config)
        self._projections = {}

    def projection(self, dim: int):
        """(1, M, D) orthogonal random projection, drawn once per head dim from ``seed``."""
        if dim not in self._projections:
            self._projections[dim] = orthogonal_gaussian(self.config.num_features, dim, seed=self.config.seed)
        return self._projections[dim]

    def features(self, q, k, call: Call):
        proj = self.projection(call.dim)
        root = call.scale ** 0.5
        return favor_features(q * root, proj, is_query=True), favor_features(k * root, proj, is_query=False)

    def _reference(self, q, k, v, call: Call):
        return naive.performer_reference(q, k, v, proj=self.projection(call.dim)[0], scale=call.scale, causal=call.causal,
                                         eps=self.config.eps)
