"""MoH: mixture-of-head attention, a learned router keeps a share of the heads per token."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import InvalidArgumentError, check_float, check_int
from ...kernels.dense import causal_mask, masked_attention, sdpa, work_dtype
from ...method import Call, Method, MethodInfo
from ...registry import register
from .base import LearnedPart


class HeadRouter(nn.Module):
    """MoH's router, one per layer: a token's queries over all heads (Hq * D channels) -> one logit per
    routed head. Starts at zero (every routed head equally likely)."""

    def __init__(self, heads: int, dim: int, routed: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(check_int("heads", heads) * check_int("dim", dim), check_int("routed", routed)))
        self.bias = nn.Parameter(torch.zeros(routed))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, Hq, N, D) -> logits (B, N, routed)."""
        x = q.transpose(1, 2).flatten(2)
        if x.shape[-1] != self.weight.shape[0]:
            raise InvalidArgumentError("q", f"heads x head_dim = {self.weight.shape[0]} (the router's input)", x.shape[-1])
        work = work_dtype(x)
        return x.to(work) @ self.weight.to(work) + self.bias.to(work)


@register
class MoH(LearnedPart, Method):
    """MoH ("MoH: Multi-Head Attention as Mixture-of-Head Attention", arXiv 2410.11842): the first
    ``shared`` query heads are always on; of the others, a learned :class:`HeadRouter` picks, per token,
    enough to keep an ``active`` share of all heads, and each picked head's output is weighted by its
    router probability renormalised over the picked ones (times their count, so a frozen model's
    scale is kept); heads not picked give zero for that token. q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv)
    -> (B, Hq, Nq, Dv). The router is distilled (``attnzoo distill --method moh``) on the frozen
    model's output. Every head is still computed (the saving needs a per-token head-sparse kernel);
    ``density`` reports the active share of (query, head) rows."""

    info = MethodInfo(
        name="moh", title="MoH: Multi-Head Attention as Mixture-of-Head Attention", arxiv="2410.11842",
        family=("head", "learned"), causal=True, non_causal=True, cross=True, gqa=True, training_free=False,
        time="O(N^2 D H_active)", memory="O(N D H)", summary="shared heads plus per-token routed heads, weighted sum",
    )
    part_name = "router"

    @dataclass
    class Config:
        """``active``: the share of query heads each token keeps, in (0, 1]; ``shared``: heads always on."""

        active: float = 0.75
        shared: int = 0

        def __post_init__(self):
            self.active = check_float("active", self.active, low=0.0, high=1.0, low_open=True)
            self.shared = check_int("shared", self.shared, minimum=0)

    def __init__(self, **config):
        super().__init__(**config)
        self.router: HeadRouter | None = None

    def check(self, call: Call) -> None:
        if self.config.shared >= call.heads_q:
            raise InvalidArgumentError("shared", f"fewer than the {call.heads_q} query heads (some must be routed)", self.config.shared)

    def new_part(self, heads: int, dim: int) -> HeadRouter:
        return HeadRouter(heads, dim, heads - self.config.shared)

    def picked(self, call: Call) -> int:
        """Routed heads each token keeps."""
        total = max(self.config.shared + 1, math.ceil(self.config.active * call.heads_q))
        return min(total, call.heads_q) - self.config.shared

    def head_weights(self, q, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
        """(B, Hq, Nq) weight of each head's output per token: 1 for shared heads, the renormalised router
        probability times the number picked for picked heads, 0 otherwise; differentiable in the router."""
        call = self._prepare(q, q, q, causal, scale, check_finite=False)
        return self._weights(q, call)

    def _weights(self, q, call: Call) -> torch.Tensor:
        probs = torch.softmax(self.part(call)(q), dim=-1)  # (B, N, routed), in q's work dtype
        pick = self.picked(call)
        chosen = torch.zeros_like(probs).scatter_(-1, probs.topk(pick, dim=-1).indices, 1.0)
        routed = chosen * probs
        routed = routed / routed.sum(-1, keepdim=True) * pick
        shared = torch.ones(*probs.shape[:2], self.config.shared, dtype=probs.dtype, device=probs.device)
        return torch.cat([shared, routed], dim=-1).transpose(1, 2)  # (B, Hq, N)

    def _forward(self, q, k, v, call: Call):
        weights = self._weights(q, call)
        out = sdpa(q, k, v, causal=call.causal, scale=call.scale).to(work_dtype(q)) * weights[..., None]
        return out.to(q.dtype), self._stats(call, weights)

    def _stats(self, call: Call, weights: torch.Tensor):
        visible = torch.full((call.len_q,), call.len_kv, device=weights.device)
        if call.causal:  # bottom-right aligned rows
            visible = (torch.arange(call.len_q, device=weights.device) + 1 + call.len_kv - call.len_q).clamp(0, call.len_kv)
        allowed = int(((weights > 0) * visible).sum())
        computed = call.batch * call.heads_q * int(visible.sum())
        return self.call_stats(call, {"computed": computed, "allowed": allowed, "backend": "torch", "executor": "sdpa"})

    def _support(self, q, k, v, call: Call) -> torch.Tensor:
        rows = (self._weights(q, call) > 0)[..., None]
        return rows & causal_mask(call.len_q, call.len_kv, q.device) if call.causal else rows.expand(-1, -1, -1, call.len_kv)

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        mask = causal_mask(call.len_q, call.len_kv, q.device) if call.causal else None
        return masked_attention(q, k, v, mask, scale=call.scale) * self._weights(q, call)[..., None].to(q.dtype)
