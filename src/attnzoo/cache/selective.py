"""Selective Attention's context pruning: evict the tokens one head's selection has masked most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError, check_int
from ..kernels.dense import causal_mask
from ..registry import ComponentInfo
from . import register
from .base import CachePolicy, CacheView


@dataclass
class SelectiveConfig:
    """``head``: the query head whose logits make the selection (the paper uses head 0); ``chunk``:
    queries scored at a time (memory)."""

    head: int = 0
    chunk: int = 512

    def __post_init__(self):
        self.head = check_int("head", self.head, minimum=0)
        self.chunk = check_int("chunk", self.chunk, minimum=1)


@register
class Selective(CachePolicy):
    """Selective Attention ("Selective Attention Improves Transformer", arXiv 2410.02703), its
    context pruning as a cache policy.

    Scoring rule (the paper's section 3): the selection matrix is S = ReLU(one head's logits
    q_i . k_j * scale), zero for a token's own key and for the sequence's first token (which is
    never masked), causal; its accumulation F_j = sum over the queries i seen so far of S_ij is
    how strongly key j has been masked for every later query, on every head. The cache keeps each
    layer's ``budget`` keys with the least F (score -F; the first token always stays). The paper
    also subtracts F from every head's logits, which a model trained without it does not expect:
    this policy applies only the pruning, training-free."""

    info = ComponentInfo(name="selective", title="Selective Attention Improves Transformer", arxiv="2410.02703",
                         family=("decode",), summary="prune the keys one head's ReLU logits mask most (accumulated)")
    Config = SelectiveConfig
    cumulative = True
    per_head = False  # one head's selection prunes the same tokens on every head

    def accumulate(self, queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        head = self.config.head
        if head >= queries.shape[1]:
            raise InvalidArgumentError("head", f"a query head index below {queries.shape[1]}", head)
        kv_head = head // (queries.shape[1] // keys.shape[1])
        nq, nk = queries.shape[2], keys.shape[2]
        real = positions[:, 0] >= 0  # (B, Nk)
        maskable = real & (positions[:, 0] > 0)  # the first real token is never masked
        strictly_before = causal_mask(nq, nk - 1, keys.device)  # query i at key nk - nq + i: keys < its own
        strictly_before = torch.cat([strictly_before, torch.zeros(nq, 1, dtype=torch.bool, device=keys.device)], dim=1)
        total = torch.zeros(keys.shape[0], nk, dtype=torch.float32, device=keys.device)
        key = keys[:, kv_head].float()
        for start in range(0, nq, self.config.chunk):
            rows = slice(start, min(start + self.config.chunk, nq))
            logits = torch.einsum("bqd,bkd->bqk", queries[:, head, rows].float(), key) * scale
            allowed = strictly_before[rows][None] & maskable[:, None, :] & real[:, nk - nq:][:, rows, None]
            total += torch.relu(logits).masked_fill(~allowed, 0.0).sum(dim=1)
        return total[:, None].expand(-1, keys.shape[1], -1)

    def score(self, view: CacheView) -> torch.Tensor:
        return torch.where(view.positions == 0, float("inf"), -view.accumulated)
