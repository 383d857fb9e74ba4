"""Sparsifiner: a learned low-rank connectivity predictor keeps the top keys of every query."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import InvalidArgumentError, check_float, check_int
from ...kernels.dense import masked_attention, repeat_kv, work_dtype
from ...method import Call, Method, MethodInfo, Stopwatch
from ...registry import register
from .base import LearnedPart


class ConnectivityPredictor(nn.Module):
    """Sparsifiner's predictor, one per layer: per query head, q and k projected to ``rank`` channels;
    their dot products (B, Hq, Nq, Nk) score every (query, key) pair. Initialised on the first ``rank``
    channels of q and k (the exact logits when ``rank`` is the head dim)."""

    def __init__(self, heads: int, dim: int, rank: int):
        super().__init__()
        heads, dim, rank = check_int("heads", heads), check_int("dim", dim), check_int("rank", rank)
        eye = torch.eye(dim, rank)
        self.query = nn.Parameter(eye.repeat(heads, 1, 1))  # (H, D, r)
        self.key = nn.Parameter(eye.repeat(heads, 1, 1))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Connectivity logits (B, Hq, Nq, Nk) of q (B, Hq, Nq, D) and k (B, Hq, Nk, D) (GQA expanded)."""
        if q.shape[1] != self.query.shape[0] or q.shape[-1] != self.query.shape[1]:
            raise InvalidArgumentError("q", f"{self.query.shape[0]} query heads of dim {self.query.shape[1]} (the predictor's shapes)",
                                       f"{q.shape[1]} heads of dim {q.shape[-1]}")
        work = work_dtype(q)
        pq, pk = q.to(work) @ self.query.to(work), k.to(work) @ self.key.to(work)
        return pq @ pk.transpose(-1, -2) * pq.shape[-1] ** -0.5


@register
class Sparsifiner(LearnedPart, Method):
    """Sparsifiner ("Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision
    Transformers", arXiv 2303.13755): a low-rank :class:`ConnectivityPredictor` scores every (query,
    key) pair cheaply and each query attends exactly (softmax) to its ``density`` share of keys with
    the best scores (at least one). The predictor is distilled (``attnzoo distill --method
    sparsifiner``) to the frozen model's attention map. q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv) ->
    (B, Hq, Nq, Dv); non-causal (vision)."""

    info = MethodInfo(
        name="sparsifiner", title="Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers",
        arxiv="2303.13755", family=("dynamic", "learned"), causal=False, non_causal=True, cross=True, gqa=True, training_free=False,
        time="O(N^2 r + N k D)", memory="O(N^2) predictor scores per head + O(N k D) gathered keys",
        summary="learned low-rank connectivity predictor, top-k keys per query, exact softmax on them",
    )
    part_name = "predictor"

    @dataclass
    class Config:
        """``density``: the share of keys each query keeps, in (0, 1]; ``rank``: the predictor's width."""

        density: float = 0.25
        rank: int = 8

        def __post_init__(self):
            self.density = check_float("density", self.density, low=0.0, high=1.0, low_open=True)
            self.rank = check_int("rank", self.rank)

    def __init__(self, **config):
        super().__init__(**config)
        self.predictor: ConnectivityPredictor | None = None

    def new_part(self, heads: int, dim: int) -> ConnectivityPredictor:
        return ConnectivityPredictor(heads, dim, min(self.config.rank, dim))

    def keep(self, call: Call) -> int:
        """Keys kept per query."""
        return max(1, math.ceil(self.config.density * call.len_kv))

    def connectivity(self, q, k, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
        """The predictor's logits (B, Hq, Nq, Nk), differentiable (the distillation trains on them)."""
        call = self._prepare(q, k, k, causal, scale, check_finite=False)
        return self.part(call)(q, repeat_kv(k, call.groups))

    def _top(self, q, k, call: Call) -> torch.Tensor:
        """(B, Hq, Nq, keep) ids of each query's best predicted keys."""
        with torch.no_grad():
            return self.part(call)(q, repeat_kv(k, call.groups)).topk(self.keep(call), dim=-1).indices

    def _forward(self, q, k, v, call: Call):
        watch = Stopwatch(call)
        top = self._top(q, k, call)  # (B, H, Nq, K)
        selection_ms = watch.lap()
        work = work_dtype(q)
        keys, values = repeat_kv(k, call.groups).to(work), repeat_kv(v, call.groups).to(work)
        pick = lambda x: torch.gather(x[:, :, None].expand(-1, -1, call.len_q, -1, -1), 3,  # noqa: E731
                                      top[..., None].expand(-1, -1, -1, -1, x.shape[-1]))
        logits = (q.to(work)[:, :, :, None] * pick(keys)).sum(-1) * call.scale  # (B, H, Nq, K)
        out = (torch.softmax(logits, dim=-1)[..., None] * pick(values)).sum(3)
        stats = self.call_stats(call, {"computed": top.numel(), "allowed": top.numel(), "backend": "torch", "executor": "gather"},
                                selection_ms=selection_ms)
        return out.to(q.dtype), stats

    def _support(self, q, k, v, call: Call) -> torch.Tensor:
        top = self._top(q, k, call)
        mask = torch.zeros(*top.shape[:3], call.len_kv, dtype=torch.bool, device=q.device)
        return mask.scatter_(-1, top, True)

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        return masked_attention(q, k, v, self._support(q, k, v, call), scale=call.scale)
