"""The contract of a KV-cache policy: a score per cached key, from which the cache keeps the best.

kvpress's shape (one small ``score`` per press) with attnzoo's conventions: keys and values in the
(B, Hkv, Nk, D) layout, queries (B, Hq, Nq, D) post-RoPE, GQA kept grouped. What is kept, and
when, is decided by the generation harness (:func:`attnzoo.compress`) from these scores and the
budget: every key / value head keeps its own ``budget`` best keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..kernels.dense import attention_probabilities, causal_mask, fold_heads
from ..method import build_config
from ..registry import ComponentInfo


@dataclass
class CacheView:
    """What a policy scores: one layer's cache at a compression.

    ``queries`` (B, Hq, Nq, D): the latest queries (up to :attr:`CachePolicy.observation` of
    them; their tokens are the last Nq cached keys); ``keys`` (B, Hkv, Nk, D) and ``values`` (B,
    Hkv, Nk, Dv): everything cached; ``positions`` (B, Hkv, Nk) int: each key's index among its
    sequence's real tokens (0 = the first token after any padding), -1 for padding (a ragged cache
    pads shorter heads on the left with -1); ``scale``: the layer's softmax scale; ``budget``: how
    many keys each head keeps (an int, or a (1, Hkv, 1) tensor when heads differ); ``accumulated`` (B, Hkv, Nk)
    float32: for :attr:`CachePolicy.cumulative` policies, the attention each key has received from
    every query so far, else None."""

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    scale: float
    budget: int | torch.Tensor
    accumulated: torch.Tensor | None = None


def attention_votes(queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scale: float,
                    chunk: int = 512) -> torch.Tensor:
    """(B, Hkv, Nk) float32: the softmax attention each key receives, summed over the query heads
    of its GQA group and over ``queries`` (B, Hq, Nq, D), the tokens of the last Nq ``keys`` (B,
    Hkv, Nk, D) (bottom-right causal). Padding keys (``positions`` -1, per head) get and give
    nothing. Keys are not repeated per query head; ``chunk`` queries at a time bound the memory."""
    groups = queries.shape[1] // keys.shape[1]
    nq, nk = queries.shape[2], keys.shape[2]
    real = (positions >= 0).repeat_interleave(groups, dim=1)  # (B, Hq, Nk): each query head sees its KV head's keys
    allowed = causal_mask(nq, nk, keys.device)[None, None] & real[:, :, None, :]
    votes = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
    for start in range(0, nq, chunk):
        rows = slice(start, min(start + chunk, nq))
        q, mask = fold_heads(queries[:, :, rows].float(), allowed[:, :, rows], groups)
        votes += attention_probabilities(q, keys.float(), scale=scale, mask=mask).sum(dim=2)
    return votes


class CachePolicy:
    """Base class of every KV-cache policy: set ``info`` and ``Config`` (a dataclass of plain
    values checked in ``__post_init__``) and implement :meth:`score`.

    Class-level switches read by the harness: :attr:`observation` (how many of the latest queries
    :meth:`score` reads; the harness keeps that many per layer between decode steps) and
    :attr:`cumulative` (keep, per cached key, the attention it has received from every query;
    costs one extra q k^T per decode step) and :attr:`per_head` (each KV head's scores read only
    that head's keys, so a ragged cache may give heads different budgets)."""

    info: ClassVar[ComponentInfo]
    Config: ClassVar[type]
    cumulative: ClassVar[bool] = False
    per_head: ClassVar[bool] = True
    sets_budget: ClassVar[bool] = False

    def __init__(self, **config: Any):
        self.config = build_config(f"cache policy {self.info.name!r}", self.Config, config)

    @property
    def observation(self) -> int:
        """How many of the latest queries :meth:`score` reads (0: none)."""
        return 0

    @property
    def minimum_budget(self) -> int:
        """The fewest keys per head this policy can keep (the tokens it always protects)."""
        return 1

    def head_budgets(self, layer: int, kv_heads: int, real_tokens: int) -> list[int] | None:
        """The keys each KV head of ``layer`` keeps after ``real_tokens`` tokens, for policies that
        set their own budgets (:attr:`sets_budget`: ``compress`` then takes no ``ratio`` /
        ``budget``); None: the harness's budget."""
        return None

    def accumulate(self, queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        """For :attr:`cumulative` policies: (B, Hkv, Nk) what ``queries`` (B, Hq, Nq, D), the tokens
        of the last Nq ``keys``, add to each key's running total (default: the attention it
        receives, :func:`attention_votes`)."""
        return attention_votes(queries, keys, positions, scale)

    def score(self, view: CacheView) -> torch.Tensor:
        """(B, Hkv, Nk) importance of each cached key (higher is kept first; +inf: always kept)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self.config).items())
        return f"{type(self).__name__}({fields})"
