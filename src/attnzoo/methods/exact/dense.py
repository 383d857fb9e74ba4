"""Exact softmax attention (the baseline every method is measured against)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...kernels.dense import attention_with_lse, causal_mask, masked_attention, sdpa
from ...method import Call, CallStats, Method, MethodInfo
from ...registry import register


@register
class Dense(Method):
    """softmax(q k^T * scale) v through torch SDPA ("Attention Is All You Need", arXiv 1706.03762).

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """

    info = MethodInfo(
        name="dense", title="Attention Is All You Need", arxiv="1706.03762", family=("exact",),
        causal=True, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(Nq Nk D)", memory="O(Nq + Nk) with fused kernels",
        summary="exact softmax attention through torch.nn.functional.scaled_dot_product_attention",
    )

    @dataclass
    class Config:
        pass

    def _forward(self, q, k, v, call: Call):
        return sdpa(q, k, v, causal=call.causal, scale=call.scale)

    def stats(self, call: Call) -> CallStats:
        return CallStats(self.info.name, "torch", density=1.0, executor="sdpa")

    def _forward_with_lse(self, q, k, v, call: Call):
        return attention_with_lse(q, k, v, causal=call.causal, scale=call.scale)

    def _support(self, q, k, v, call: Call):
        """Every pair causality allows."""
        return causal_mask(call.len_q, call.len_kv, q.device) if call.causal else torch.ones(1, 1, dtype=torch.bool, device=q.device)

    def _reference(self, q, k, v, call: Call):
        mask = causal_mask(call.len_q, call.len_kv, q.device) if call.causal else None
        return masked_attention(q, k, v, mask, scale=call.scale)
