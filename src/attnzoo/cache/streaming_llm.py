"""StreamingLLM as a cache policy: the attention sinks and a window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_int
from ..registry import ComponentInfo
from . import register
from .base import CachePolicy, CacheView


@dataclass
class StreamingLLMConfig:
    """``sinks``: the first tokens of each sequence, always kept; the rest of the budget is the
    window of the most recent tokens."""

    sinks: int = 4

    def __post_init__(self):
        self.sinks = check_int("sinks", self.sinks, minimum=0)


@register
class StreamingLLM(CachePolicy):
    """StreamingLLM ("Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453).

    Scoring rule (the paper's section 3.2): keep the KV of the first ``sinks`` tokens (the attention
    sinks, counted from each sequence's first real token) and of the most recent ``budget - sinks``
    tokens; evict the middle. The score is the token's position, +inf for the sinks. Content-blind:
    every head keeps the same tokens. (The prefill method with the same pattern is ``streaming``.)"""

    info = ComponentInfo(name="streaming_llm", title="Efficient Streaming Language Models with Attention Sinks", arxiv="2309.17453",
                         family=("decode",), summary="attention sinks + recent window")
    Config = StreamingLLMConfig

    @property
    def minimum_budget(self) -> int:
        return self.config.sinks + 1

    def score(self, view: CacheView) -> torch.Tensor:
        positions = view.positions.float()
        return torch.where(view.positions < self.config.sinks, float("inf"), positions)
