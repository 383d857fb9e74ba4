"""RALA: rank-augmented linear attention (query-aware weighting of the KV buffer)."""

from __future__ import annotations

import torch

from ...kernels.dense import attention_scores, repeat_kv
from ...kernels.linear.feature_maps import fixed_map
from ...method import Call, MethodInfo
from ...registry import register
from . import naive
from .base import KernelizedConfig, LinearMethod


@register
class RALA(LinearMethod):
    """Rank-augmented linear attention ("Breaking the Low-Rank Dilemma of Linear Attention", arXiv
    2411.07635): the KV buffer ``sum_j alpha_j phi(k_j)^T v_j`` weights each key by ``alpha_j = N
    softmax_j(phi_bar . phi(k_j) * scale)`` with the mean query feature ``phi_bar = mean_i
    phi(q_i)`` (on the features, as in the paper's Eq. and code), which raises the buffer's rank;
    output ``phi(q_i) KV / phi(q_i) sum_j alpha_j phi(k_j)^T`` with ``phi = elu + 1``.
    The paper's output rank augmentation (an elementwise product with a projection of the block
    input) needs the layer input and is left to the caller. Non-causal (q_bar uses every query).
    q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv) -> (B, Hq, Nq, Dv)."""

    info = MethodInfo(
        name="rala", title="Breaking the Low-Rank Dilemma of Linear Attention", arxiv="2411.07635",
        family=("linear",), causal=False, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(N D Dv)", memory="O(N (D + Dv))",
        summary="linear attention with a query-aware (softmax of the mean query) weighting of keys",
    )
    Config = KernelizedConfig

    def key_weights(self, qf, kf, call: Call) -> torch.Tensor:
        """(B, Hq, Nk, 1) weights ``alpha = N softmax(mean_i phi(q_i) phi(K)^T * scale)`` from the
        features qf (B, Hq, Nq, F), kf (B, Hq, Nk, F)."""
        q_bar = qf.mean(dim=2, keepdim=True)
        return (call.len_kv * torch.softmax(attention_scores(q_bar, kf, scale=call.scale), dim=-1)).transpose(-1, -2)

    def features(self, q, k, call: Call):
        phi = fixed_map(self.config.feature_map)
        qf, kf = phi(q), repeat_kv(phi(k), call.groups)
        return qf, kf * self.key_weights(qf, kf, call).to(kf.dtype)

    def _reference(self, q, k, v, call: Call):
        return naive.rala_reference(q, k, v, feature_map=self.config.feature_map, scale=call.scale, eps=self.config.eps)
