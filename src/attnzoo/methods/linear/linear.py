"""Kernelized linear attention (Katharopoulos et al.) and the base class of the linear family."""

from __future__ import annotations

from ...kernels.linear.feature_maps import fixed_map
from ...method import MethodInfo
from ...registry import register
from . import naive
from .base import KernelizedConfig, LinearMethod


@register
class Linear(LinearMethod):
    """Kernelized linear attention ("Transformers are RNNs: Fast Autoregressive Transformers with
    Linear Attention", arXiv 2006.16236): ``out_i = phi(q_i) sum_j phi(k_j)^T v_j / (phi(q_i)
    sum_j phi(k_j) + eps)``, causal sums over j <= i. q (B, Hq, Nq, D), k (B, Hkv, Nk, D),
    v (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv). ``scale`` is not used (the feature maps are scale-free)."""

    info = MethodInfo(
        name="linear", title="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
        arxiv="2006.16236", family=("linear",), causal=True, non_causal=True, cross=True, gqa=True,
        training_free=True, time="O(N D Dv) (+ O(N C D) causal)", memory="O(N (D + Dv))",
        summary="phi(Q)(phi(K)^T V) with a named feature map (elu+1, relu, ...), chunked causal form",
    )
    Config = KernelizedConfig

    def features(self, q, k, call):
        phi = fixed_map(self.config.feature_map)
        return phi(q), phi(k)

    def _reference(self, q, k, v, call):
        return naive.kernelized_reference(q, k, v, feature_map=self.config.feature_map, causal=call.causal, eps=self.config.eps)
