"""H2O: heavy hitters (the keys that have received the most attention) plus the recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_float
from ..registry import ComponentInfo
from . import register
from .base import CachePolicy, CacheView


@dataclass
class H2OConfig:
    """``recent``: the fraction of the budget given to the most recent tokens; the rest goes to the
    heavy hitters."""

    recent: float = 0.5

    def __post_init__(self):
        self.recent = check_float("recent", self.recent, low=0.0, high=1.0)


@register
class H2O(CachePolicy):
    """H2O ("H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
    arXiv 2306.14048).

    Scoring rule (the paper's section 3, Algorithm 1): a key's score is the attention it has
    accumulated from every query so far (prompt queries at prefill, then each generated token's),
    summed over the query heads of its GQA group; each head keeps its ``budget - recent`` top keys
    by that score plus the ``recent = floor(recent * budget)`` most recent tokens. With
    ``interval=1`` the cache evicts at every decode step, as the paper's greedy algorithm does."""

    info = ComponentInfo(name="h2o", title="H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
                         arxiv="2306.14048", family=("decode",), summary="accumulated attention (heavy hitters) + recent window")
    Config = H2OConfig
    cumulative = True

    def score(self, view: CacheView) -> torch.Tensor:
        recent = torch.as_tensor(view.budget, device=view.positions.device).mul(self.config.recent).floor()
        newest = view.positions.amax(dim=-1, keepdim=True)
        return torch.where(view.positions > newest - recent, float("inf"), view.accumulated)
