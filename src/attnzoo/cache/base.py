"""The contract of a KV-cache policy: a score per cached key, from which the cache keeps the best.

kvpress's shape (one small ``score`` per press) with attnzoo's conventions: keys and values in the
(B, Hkv, Nk, D) layout, queries (B, Hq, Nq, D) post-RoPE, GQA kept grouped. What is kept, and
when, is decided by the generation harness from these scores and the budget.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..method import build_config
from ..registry import ComponentInfo


class CachePolicy:
    """Base class of every KV-cache policy: set ``info`` and ``Config`` (a dataclass of plain
    values checked in ``__post_init__``) and implement :meth:`score`."""

    info: ClassVar[ComponentInfo]
    Config: ClassVar[type]

    def __init__(self, **config: Any):
        self.config = build_config(f"cache policy {self.info.name!r}", self.Config, config)

    def score(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, Nk) importance of each cached key (higher is kept first), from the latest
        queries (B, Hq, Nq, D) and the cache's keys (B, Hkv, Nk, D) and values (B, Hkv, Nk, Dv)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self.config).items())
        return f"{type(self).__name__}({fields})"
