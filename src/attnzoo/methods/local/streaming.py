"""StreamingLLM / MInference A-shape: attention sinks plus a local window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import check_int
from ...kernels.block_sparse.builders import range_layout
from ...masks import CausalMask, and_masks, band, or_masks, sink_tokens
from ...method import Call, MethodInfo
from ...registry import register
from .base import PatternMethod


@register
class Streaming(PatternMethod):
    """Each query sees the first ``sinks`` tokens and its ``window`` most recent keys (itself
    included), causal ("Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453;
    the A-shape of "MInference 1.0", arXiv 2407.02490). Nq != Nk aligns queries bottom-right."""

    info = MethodInfo(
        name="streaming", title="Efficient Streaming Language Models with Attention Sinks", arxiv="2309.17453",
        family=("local",), causal=True, non_causal=False, cross=True, gqa=True, training_free=True,
        time="O(N (sinks + window) D)", memory="O(N (sinks + window)) bools of cached mask",
        summary="attention sinks + local window (StreamingLLM, MInference A-shape)",
    )

    @dataclass
    class Config:
        sinks: int = 4
        window: int = 1024

        def __post_init__(self):
            self.sinks = check_int("sinks", self.sinks, minimum=0)
            self.window = check_int("window", self.window, minimum=1)

    def mask_mod(self, call: Call):
        off = call.len_kv - call.len_q
        recent = band(self.config.window - 1, 0, off)
        return and_masks(or_masks(sink_tokens(self.config.sinks), recent), CausalMask(off))

    def build_layout(self, call: Call):
        w = self.config.window
        return range_layout(call, self.q_block, lambda p: p - w + 1, lambda p: p + 1, sinks=self.config.sinks)

    def reference_mask(self, call: Call) -> torch.Tensor:
        p = torch.arange(call.len_q, device=call.device)[:, None] + (call.len_kv - call.len_q)
        j = torch.arange(call.len_kv, device=call.device)[None, :]
        return (j <= p) & ((j < self.config.sinks) | (p - j < self.config.window))
