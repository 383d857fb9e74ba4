"""EchoAtt's shared attention maps (Rajabzadeh et al., 2024, arXiv 2409.14595).

EchoAtt lets a layer whose attention maps match the previous layer's reuse that layer's attention
probabilities with its own values. The method here is that product, softmax(q_s k_s^T * scale)
v: attention with the source layer's queries and keys (which define its probabilities) over the
echo layer's values. Inside a model the cross-layer hand-over is
:mod:`attnzoo.integrations.transformers.echo` (``attnzoo.patch(model, "echo", config=...)`` with
the config :func:`~attnzoo.integrations.transformers.echo.echo_search` writes).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...kernels.dense import sdpa
from ...method import Call, MethodInfo
from ...registry import register
from .dense import Dense


@register
class Echo(Dense):
    """softmax(q k^T * scale) v where q and k are the source layer's (post-RoPE) and v the echo
    layer's own: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv)."""

    info = MethodInfo(
        name="echo", title="EchoAtt: Attend, Copy, then Adjust for More Efficient Large Language Models", arxiv="2409.14595",
        family=("head",), causal=True, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(Nq Nk D)", memory="O(Nq + Nk) with fused kernels (the source's q and k are handed over, not its N x N map)",
        summary="a layer reuses an earlier layer's attention probabilities with its own values (training-free part of EchoAtt)",
    )

    @dataclass
    class Config:
        pass

    def _forward(self, q, k, v, call: Call):
        # a one-query step over a cache sees every key (bottom-right causal): the fused kernel, no mask
        return sdpa(q, k, v, causal=call.causal and call.len_q > 1, scale=call.scale)

    @staticmethod
    def patch_plans(found, config):
        """{layer: LayerPlan} for ``attnzoo.patch(model, "echo", config=...)`` on the model's layers
        ``found``: ``config`` an ``attnzoo-echo/1`` file or dict
        (:func:`~attnzoo.integrations.transformers.echo.echo_search`)."""
        from ...integrations.transformers.echo import echo_plans

        return echo_plans(found, config)
