"""TransNormer / TransNormerLLM: NormAttention (normalised after the product), DiagAttention for
lower layers, LRPE with exponential decay."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import InvalidArgumentError, UnsupportedError, check_float, check_int
from ...kernels.dense import repeat_kv, sdpa
from ...kernels.linear.feature_maps import fixed_map, lrpe, lrpe_theta
from ...method import Call, MethodInfo
from ...registry import register
from . import naive
from .base import KernelizedConfig, LinearMethod
from .decay import check_decay, check_layer, decay_for, layer_scale

MODES = ("norm", "diag")


@dataclass
class TransNormerConfig(KernelizedConfig):
    """``mode``: ``"norm"`` (NormAttention, upper layers) or ``"diag"`` (DiagAttention: softmax
    attention inside non-overlapping blocks of ``block_size`` tokens, lower layers).
    NormAttention: ``feature_map`` (default ``silu``, TransNormerLLM's swish), ``decay`` as in
    ``lightning`` (the LRPE-d decay; causal only); ``layer`` / ``num_layers`` (with
    ``decay="alibi"``): this layer's index, which scales the ALiBi slopes by ``1 - layer /
    (num_layers - 1) + 1e-5`` as TransNormerLLM does; ``lrpe`` rotates features by position with
    angles split across heads, ``lrpe_base^(-2 (h D + i) / (H D))`` for head h; the output is
    RMS-normalised over all heads' values of a token (SRMSNorm over the layer's H Dv channels)."""

    feature_map: str = "silu"
    mode: str = "norm"
    decay: object = None
    lrpe: bool = True
    lrpe_base: float = 10000.0
    block_size: int = 64
    layer: int | None = None
    num_layers: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise InvalidArgumentError("mode", f"one of {MODES}", repr(self.mode))
        self.decay = check_decay(self.decay)
        if not isinstance(self.lrpe, bool):
            raise InvalidArgumentError("lrpe", "a bool", repr(self.lrpe))
        self.lrpe_base = check_float("lrpe_base", self.lrpe_base, low=1.0, high=1e12)
        self.block_size = check_int("block_size", self.block_size)
        self.layer, self.num_layers = check_layer(self.layer, self.num_layers, self.decay)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """SRMSNorm without gain over every head of a token: x (B, H, N, Dv) divided by
    ``sqrt(mean_{h, d} x^2 + eps)``, the norm of the (B, N, H Dv) layer output."""
    return x * torch.rsqrt((x * x).mean(dim=(1, 3), keepdim=True) + eps)


@register
class TransNormer(LinearMethod):
    """TransNormerLLM ("Scaling TransNormer to 175 Billion Parameters", arXiv 2307.14995; TransNormer,
    arXiv 2210.10340). NormAttention: ``O = RMSNorm([(phi(Q) phi(K)^T) * M] V)`` with LRPE features
    (``q_s k_t cos(theta_h (s - t))``, angles split across heads) and decay ``M_st =
    lambda_h^(s-t)``: no division by a normaliser, the norm (across all heads of a token) after the
    product keeps gradients bounded. The output gate ``sigmoid(x W_u) * O`` multiplies by a
    projection of the layer input, which the operator does not see: the caller applies it.
    DiagAttention: softmax attention inside blocks. q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv) ->
    (B, Hq, Nq, Dv)."""

    info = MethodInfo(
        name="transnormer", title="Scaling TransNormer to 175 Billion Parameters", arxiv="2307.14995",
        family=("linear",), causal=True, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(N D Dv) (norm), O(N b D) (diag)", memory="O(N (D + Dv))",
        summary="NormAttention (RMS norm after the product, LRPE, decay) or block-diagonal DiagAttention",
    )
    Config = TransNormerConfig
    normalize = False

    def check(self, call: Call) -> None:
        if self.config.mode == "diag":
            if not call.self_attention:
                raise UnsupportedError(f"transnormer mode='diag' needs self-attention; got Nq={call.len_q}, Nk={call.len_kv}")
        else:
            decay_for(self.config.decay, call)

    def features(self, q, k, call: Call):
        phi = fixed_map(self.config.feature_map)
        qf, kf = phi(q), repeat_kv(phi(k), call.groups)  # keys take their query head's angles
        if self.config.lrpe:
            theta = lrpe_theta(call.dim, self.config.lrpe_base, call.heads_q)
            offset = call.len_kv - call.len_q
            qf = lrpe(qf, theta, torch.arange(call.len_q) + offset)
            kf = lrpe(kf, theta, torch.arange(call.len_kv))
        return qf, kf

    def decay(self, call: Call):
        return decay_for(self.config.decay, call, layer_scale(self.config.layer, self.config.num_layers))

    def finish(self, out, q, k, v, call: Call):
        return rms_normalize(out, self.config.eps)

    def _forward(self, q, k, v, call: Call):
        if self.config.mode == "norm":
            return super()._forward(q, k, v, call)
        b, n = self.config.block_size, call.len_q
        full = n // b * b
        parts = []
        if full:
            # blocks move to the batch axis: (B * n/b, H, b, D)
            blocks = lambda t: t[:, :, :full].unflatten(2, (full // b, b)).transpose(1, 2).flatten(0, 1)  # noqa: E731
            out = sdpa(blocks(q), blocks(k), blocks(v), causal=call.causal, scale=call.scale)
            parts.append(out.unflatten(0, (call.batch, full // b)).transpose(1, 2).flatten(2, 3))
        if full < n:
            parts.append(sdpa(q[:, :, full:], k[:, :, full:], v[:, :, full:], causal=call.causal, scale=call.scale))
        return torch.cat(parts, dim=2)

    def _reference(self, q, k, v, call: Call):
        cfg = self.config
        if cfg.mode == "diag":
            return naive.block_diagonal_reference(q, k, v, block_size=cfg.block_size, causal=call.causal, scale=call.scale)
        decay = naive.lightning_decay(cfg.decay, call.heads_q, cfg.layer, cfg.num_layers)
        return naive.transnormer_reference(q, k, v, feature_map=cfg.feature_map, causal=call.causal, eps=cfg.eps,
                                           lrpe_base=cfg.lrpe_base if cfg.lrpe else None, decay=decay)
