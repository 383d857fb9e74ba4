"""MoA: a sliding-window span per head (and per layer, through the patch config), with sinks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...errors import InvalidArgumentError, check_int
from ...kernels.block_sparse.builders import range_layout
from ...masks import CausalMask, and_masks, band, or_masks, sink_tokens
from ...method import Call, MethodInfo
from ...registry import register
from .base import PatternMethod


@dataclass
class MoAConfig:
    """Per-head spans: ``spans`` (one int for all heads, or one per query head), or MoA's elastic
    rule span_h = alpha_h + beta_h * N (``alpha`` and ``beta``, one per head). ``sinks`` leading
    tokens stay visible to every query."""

    spans: int | Sequence[int] | None = None
    alpha: Sequence[float] | None = None
    beta: Sequence[float] | None = None
    sinks: int = 64

    def __post_init__(self):
        self.sinks = check_int("sinks", self.sinks, minimum=0)
        if self.spans is not None and (self.alpha is not None or self.beta is not None):
            raise InvalidArgumentError("spans", "either spans or the elastic rule (alpha, beta), not both", "both")
        if self.spans is None and (self.alpha is None) != (self.beta is None):
            raise InvalidArgumentError("alpha, beta", "both lists (one value per head)", f"alpha={self.alpha}, beta={self.beta}")
        if self.spans is None and self.alpha is None:
            self.spans = 1024
        if isinstance(self.spans, int):
            check_int("spans", self.spans)
        elif self.spans is not None:
            self.spans = tuple(check_int(f"spans[{i}]", s) for i, s in enumerate(self.spans))
        if self.alpha is not None:
            if len(self.alpha) != len(self.beta):
                raise InvalidArgumentError("beta", f"{len(self.alpha)} values (as many as alpha)", len(self.beta))
            self.alpha, self.beta = tuple(float(a) for a in self.alpha), tuple(float(b) for b in self.beta)

    def head_spans(self, heads: int, length: int) -> list[int]:
        if isinstance(self.spans, int):
            return [self.spans] * heads
        values = self.spans if self.spans is not None else [round(a + b * length) for a, b in zip(self.alpha, self.beta)]
        if len(values) != heads:
            name = "spans" if self.spans is not None else "alpha, beta"
            raise InvalidArgumentError(name, f"{heads} values (one per query head)", len(values))
        return [max(1, int(v)) for v in values]


@register
class MoA(PatternMethod):
    """Mixture of Sparse Attention ("MoA: Mixture of Sparse Attention for Automatic Large Language
    Model Compression", arXiv 2406.14909): each head h sees the first ``sinks`` tokens and its own
    span_h most recent keys; spans are given, or follow MoA's elastic rule alpha_h + beta_h * N
    (N = key length). Causal; Nq != Nk aligns queries bottom-right. q (B, Hq, Nq, D)."""

    info = MethodInfo(
        name="moa", title="MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression", arxiv="2406.14909",
        family=("local", "decode"), causal=True, non_causal=False, cross=True, gqa=True, training_free=True,
        time="O(N mean(span) D)", memory="O(H N max(span)) cached key lists",
        summary="heterogeneous per-head sliding-window spans with sinks",
    )
    Config = MoAConfig

    def mask_mod(self, call: Call):
        spans = torch.tensor(self.config.head_spans(call.heads_q, call.len_kv), device=call.device)
        off = call.len_kv - call.len_q
        return and_masks(or_masks(sink_tokens(self.config.sinks), band(spans - 1, 0, off)), CausalMask(off))

    def build_layout(self, call: Call):
        spans = torch.tensor(self.config.head_spans(call.heads_q, call.len_kv), device=call.device)[:, None]
        if bool((spans == spans[0]).all()):
            spans = spans[0]  # one span for every head: one shared layout
        return range_layout(call, self.q_block, lambda p: p - spans + 1, lambda p: p + 1, sinks=self.config.sinks)

    def reference_mask(self, call: Call) -> torch.Tensor:
        spans = self.config.head_spans(call.heads_q, call.len_kv)
        p = torch.arange(call.len_q, device=call.device)[:, None] + (call.len_kv - call.len_q)
        j = torch.arange(call.len_kv, device=call.device)[None, :]
        return torch.stack([(j <= p) & ((j < self.config.sinks) | (p - j < s)) for s in spans])[None]
