"""SnapKV: each head keeps the prompt keys its observation window votes for."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError, check_int
from ..registry import ComponentInfo
from . import register
from .base import CachePolicy, CacheView, attention_votes


@dataclass
class SnapKVConfig:
    """``window``: the observation window (the latest queries that vote, whose own keys are always
    kept); ``kernel``: the 1-D pooling width over the votes (odd); ``pooling``: ``"max"`` or ``"avg"``."""

    window: int = 32
    kernel: int = 7
    pooling: str = "max"

    def __post_init__(self):
        self.window = check_int("window", self.window, minimum=1)
        self.kernel = check_int("kernel", self.kernel, minimum=1)
        if self.kernel % 2 == 0:
            raise InvalidArgumentError("kernel", "an odd pooling width (the pooled votes stay aligned with the keys)", self.kernel)
        if self.pooling not in ("max", "avg"):
            raise InvalidArgumentError("pooling", "'max' or 'avg'", repr(self.pooling))


@register
class SnapKV(CachePolicy):
    """SnapKV ("SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469).

    Scoring rule (the paper's section 4): the last ``window`` queries (the observation window)
    attend, causally, to every cached key; each key's votes are its softmax weights summed over the
    window's queries and, for GQA, over the query heads sharing its key / value head (scored per
    KV group, keys never copied). The votes are pooled over neighbouring keys (1-D max or average
    pooling of width ``kernel``, so the kept tokens come with their context) and each head keeps its
    top keys; the window's own keys are always kept."""

    info = ComponentInfo(name="snapkv", title="SnapKV: LLM Knows What You are Looking for Before Generation", arxiv="2404.14469",
                         family=("decode",), summary="observation-window votes, pooled, per-head top-k")
    Config = SnapKVConfig

    @property
    def observation(self) -> int:
        return self.config.window

    @property
    def minimum_budget(self) -> int:
        return self.config.window

    def score(self, view: CacheView) -> torch.Tensor:
        votes = attention_votes(view.queries, view.keys, view.positions, view.scale)
        b, h, n = votes.shape
        pad = self.config.kernel // 2
        flat = votes.reshape(b * h, 1, n)
        if self.config.pooling == "max":
            pooled = F.max_pool1d(flat, self.config.kernel, stride=1, padding=pad)
        else:
            pooled = F.avg_pool1d(flat, self.config.kernel, stride=1, padding=pad, count_include_pad=False)
        pooled = pooled.reshape(b, h, n)
        pooled[..., n - view.queries.shape[2]:] = float("inf")  # the observation window itself
        return pooled
