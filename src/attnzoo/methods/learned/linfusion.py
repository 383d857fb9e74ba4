"""LinFusion: normalisation-aware, non-causal linear attention with a learnable kernel."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...method import MethodInfo
from ...registry import register
from .base import LearnedFeatureMethod, LearnedMapConfig
from .maps import KernelMLP


@dataclass
class LinFusionConfig(LearnedMapConfig):
    """``width``: the MLP width of a new :class:`~attnzoo.methods.learned.maps.KernelMLP` (default:
    head dim). The trained map is state, not config: pass ``feature_map=`` to the constructor or
    let ``method.fit(q, k, causal=False)`` distil it; an untrained one is exactly elu + 1."""


@register
class LinFusion(LearnedFeatureMethod):
    """LinFusion ("LinFusion: 1 GPU, 1 Minute, 16K Image", arXiv 2409.02097): generalized linear
    attention that is normalisation-aware (each query's weights sum to one, ``phi(q_i) sum_j
    phi(k_j)^T v_j / phi(q_i) sum_j phi(k_j)``, so feature scales stay consistent across resolutions)
    and non-causal (every token sees every token, as in a diffusion UNet), with a learnable kernel
    ``phi(x) = elu(x + MLP(x)) + 1`` per head, distilled from the teacher's softmax attention
    (``fit``). q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv) -> (B, Hq, Nq, Dv)."""

    info = MethodInfo(
        name="linfusion", title="LinFusion: 1 GPU, 1 Minute, 16K Image", arxiv="2409.02097",
        family=("linear", "learned"), causal=False, non_causal=True, cross=True, gqa=True, training_free=False,
        time="O(N D Dv)", memory="O(N (D + Dv))",
        summary="normalised non-causal linear attention with a learnable residual-MLP kernel",
    )
    map_type = KernelMLP
    Config = LinFusionConfig

    def new_map(self, heads: int, dim: int) -> nn.Module:
        return KernelMLP(heads, dim, self.config.width)
