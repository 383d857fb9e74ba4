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
        time="O(N^2 (r + D))", memory="O(256 N) predictor scores and logits per head (256 queries at a time)",
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
        """Exact softmax over each query's kept keys, ``rows`` queries at a time: the predictor's top
        keys become a boolean row mask over the exact logits (one q k^T per chunk, O(rows Nk)
        memory), which on a CPU beats gathering a (rows, keep, D) copy of the keys per query."""
        watch = Stopwatch(call)
        selection_ms, rows = 0.0, 256
        keys, values = repeat_kv(k, call.groups), repeat_kv(v, call.groups)
        out = []
        for start in range(0, call.len_q, rows):
            chunk = q[:, :, start:start + rows]
            watch.lap()
            top = self._top(chunk, k, call)
            kept = torch.zeros(*top.shape[:3], call.len_kv, dtype=torch.bool, device=q.device).scatter_(-1, top, True)
            selection_ms += watch.lap()
            out.append(masked_attention(chunk, keys, values, kept, scale=call.scale))
        kept_pairs = call.batch * call.heads_q * call.len_q * self.keep(call)
        stats = self.call_stats(call, {"computed": call.batch * call.heads_q * call.len_q * call.len_kv, "allowed": kept_pairs,
                                       "backend": "torch", "executor": "masked dense"}, selection_ms=selection_ms)
        return torch.cat(out, dim=2), stats

    def _support(self, q, k, v, call: Call) -> torch.Tensor:
        top = self._top(q, k, call)
        mask = torch.zeros(*top.shape[:3], call.len_kv, dtype=torch.bool, device=q.device)
        return mask.scatter_(-1, top, True)

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        return masked_attention(q, k, v, self._support(q, k, v, call), scale=call.scale)
