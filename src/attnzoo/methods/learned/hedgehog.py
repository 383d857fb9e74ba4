"""Hedgehog: a learnable, softmax-mimicking MLP feature map, fitted to a teacher's attention; with
``window`` the LoLCATs hybrid (softmax on the latest keys, Hedgehog linear attention on the rest)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UnsupportedError, check_int
from ...kernels.dense import repeat_kv, work_dtype
from ...kernels.linear import state_product
from ...method import Call, MethodInfo
from ...registry import register
from .base import LearnedFeatureMethod, LearnedMapConfig
from .maps import HedgehogFeatureMap


@dataclass
class HedgehogConfig(LearnedMapConfig):
    """``width``: the F features per sign of a new :class:`~attnzoo.methods.learned.maps.HedgehogFeatureMap`
    (default: head dim). ``window``: 0 (linear attention over every key) or w > 0, the LoLCATs hybrid:
    each query's latest w keys (itself included) by softmax, the older ones by the linear map (causal
    self-attention only). The trained map itself is state, not config: pass ``feature_map=`` to the
    constructor, or let ``method.fit(q, k)`` train one on sample queries/keys; without one an
    untrained map (W = I) runs."""

    window: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.window = check_int("window", self.window, minimum=0)


def window_terms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window softmax terms of causal self-attention, q, k (B, H, N, D), v (B, H, N, Dv) ->
    (sum_j e^(s_ij - m_i) v_j (B, H, N, Dv), sum_j e^(s_ij - m_i) (B, H, N, 1)) over the keys
    j in (i - window, i], m_i the largest of their logits s_ij = q_i . k_j * scale; O(N window D):
    each block of ``window`` queries against the 2 * window keys ending at its last query."""
    n = q.shape[2]
    padded = -(-n // window) * window
    q_blocks = F.pad(q, (0, 0, 0, padded - n)).unflatten(2, (-1, window))  # (B, H, nb, w, D)
    k_blocks = F.pad(k, (0, 0, window, padded - n)).unfold(2, 2 * window, window)  # (B, H, nb, D, 2w)
    v_blocks = F.pad(v, (0, 0, window, padded - n)).unfold(2, 2 * window, window)  # (B, H, nb, Dv, 2w)
    row = torch.arange(window, device=q.device)[:, None]
    col = torch.arange(2 * window, device=q.device)[None, :]
    key_position = torch.arange(0, padded, window, device=q.device)[:, None, None] + col - window  # (nb, 1, 2w)
    inside = (col > row) & (col <= row + window) & (key_position >= 0)  # (nb, w, 2w)
    logits = (q_blocks @ k_blocks * scale).masked_fill(~inside, float("-inf"))
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    numerator = (weights @ v_blocks.transpose(-1, -2)).flatten(2, 3)[:, :, :n]
    return numerator, weights.sum(-1, keepdim=True).flatten(2, 3)[:, :, :n]


@register
class Hedgehog(LearnedFeatureMethod):
    """Hedgehog ("The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry",
    arXiv 2402.04347): normalised linear attention with the learnable feature map ``[softmax(xW + b),
    softmax(-xW - b)]`` per head (queries and keys separately), trained so its attention weights
    match softmax attention (``fit``). q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv) -> (B, Hq, Nq, Dv);
    ``scale`` is only used by ``fit``'s teacher and the window.

    With ``window`` w > 0 it is LoLCATs' hybrid ("LoLCATs: On Low-Rank Linearizing of Large Language
    Models", arXiv 2410.10254): query i weighs key j by ``g_h e^(s_ij - m_i)`` for the latest w keys
    (i - w < j <= i; s the scaled logits, m_i their largest) and by ``(1 - g_h) phi(q_i) . phi(k_j)``
    for the older ones, one normalisation over both; ``g_h = sigmoid(window_factor_h)`` is learned
    per query head (0.5 until trained). Causal self-attention only."""

    info = MethodInfo(
        name="hedgehog", title="The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry",
        arxiv="2402.04347", family=("linear", "learned"), causal=True, non_causal=True, cross=True, gqa=True,
        training_free=False, time="O(N F (D + Dv) + N w D)", memory="O(N (F + Dv) + N w)",
        summary="learnable spiky/monotone MLP feature map distilled from softmax attention weights (+ LoLCATs window)",
    )
    map_type = HedgehogFeatureMap
    Config = HedgehogConfig

    def __init__(self, *, feature_map: nn.Module | None = None, **config):
        super().__init__(feature_map=feature_map, **config)
        self.register_parameter("window_factor", None)  # (Hq,) logits of g_h, made by materialize when window > 0

    def new_map(self, heads: int, dim: int) -> nn.Module:
        return HedgehogFeatureMap(heads, dim, self.config.width)

    def materialize(self, heads_q: int, heads_kv: int, dim: int, dim_v: int) -> None:
        super().materialize(heads_q, heads_kv, dim, dim_v)
        if self.config.window and self.window_factor is None:
            self.window_factor = nn.Parameter(torch.zeros(heads_q))

    def check(self, call: Call) -> None:
        if self.config.window and (not call.causal or call.len_q != call.len_kv):
            raise UnsupportedError(f"hedgehog with window={self.config.window} (the LoLCATs hybrid) runs causal self-attention "
                                   f"only; this call has causal={call.causal}, {call.len_q} queries and {call.len_kv} keys")

    def window_share(self, call: Call, dtype: torch.dtype) -> torch.Tensor:
        """(Hq, 1, 1) the softmax window's factor g_h per query head (0.5 for an untrained method)."""
        if self.window_factor is None:
            return torch.full((call.heads_q, 1, 1), 0.5, dtype=dtype, device=call.device)
        return torch.sigmoid(self.window_factor.to(dtype))[:, None, None]

    def hybrid_weights(self, q, k, *, scale: float | None = None) -> torch.Tensor:
        """The hybrid's attention weights (B, Hq, N, N) of causal self-attention q (B, Hq, N, D), k (B, Hkv, N, D)
        (rows sum to one; the quadratic form, differentiable in the map and the window factor)."""
        call = self._prepare(q, k, k, True, scale, check_finite=False)
        work = work_dtype(q)
        qf, kf = self.features(q, k, call)
        logits = q.to(work) @ repeat_kv(k, call.groups).to(work).transpose(-1, -2) * call.scale
        i = torch.arange(call.len_q, device=q.device)[:, None]
        j = torch.arange(call.len_kv, device=q.device)[None, :]
        recent, older = (j <= i) & (j > i - self.config.window), j <= i - self.config.window
        logits = logits.masked_fill(~recent, float("-inf"))
        share = self.window_share(call, work)
        weights = share * torch.exp(logits - logits.amax(-1, keepdim=True)) + (1 - share) * (qf @ kf.transpose(-1, -2)) * older
        return weights / weights.sum(-1, keepdim=True)

    def _forward(self, q, k, v, call: Call):
        if not self.config.window:
            return super()._forward(q, k, v, call)
        work, w = work_dtype(q), self.config.window
        qf, kf = self.features(q, k, call)
        k, v = repeat_kv(k, call.groups).to(work), repeat_kv(v, call.groups).to(work)
        lagged = lambda x: F.pad(x, (0, 0, w, 0))[:, :, : call.len_kv]  # noqa: E731  key j arrives at position j + w
        older = state_product(qf, lagged(kf), lagged(v), causal=True, chunk=self.config.chunk, backend=self.backend, append_ones=True)
        recent, recent_sum = window_terms(q.to(work), k, v, w, call.scale)
        share = self.window_share(call, work)
        out = (share * recent + (1 - share) * older[..., :-1]) / (share * recent_sum + (1 - share) * older[..., -1:])
        return out.to(q.dtype)

    def _reference(self, q, k, v, call: Call):
        if not self.config.window:
            return super()._reference(q, k, v, call)
        weights = self.hybrid_weights(q, k, scale=call.scale)
        return (weights @ repeat_kv(v, call.groups).to(weights.dtype)).to(q.dtype)
