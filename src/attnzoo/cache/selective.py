"""Selective Attention: one head's selection, subtracted from every head's logits, and context pruning
that evicts the tokens the selection has masked most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError, check_int
from ..kernels.dense import attention_scores, causal_mask, masked_softmax, repeat_kv
from ..registry import ComponentInfo
from . import register
from .attend import appended_mask
from .base import CachePolicy, CacheView


@dataclass
class SelectiveConfig:
    """``head``: the query head whose logits make the selection (the paper uses head 0); ``chunk``:
    queries scored at a time (memory); ``subtract``: also subtract the accumulated selection from
    every head's logits, as the paper's models are trained to (the cache then computes attention
    itself); off by default, since a model trained without it does not expect it."""

    head: int = 0
    chunk: int = 512
    subtract: bool = False

    def __post_init__(self):
        self.head = check_int("head", self.head, minimum=0)
        self.chunk = check_int("chunk", self.chunk, minimum=1)
        if not isinstance(self.subtract, bool):
            raise InvalidArgumentError("subtract", "True or False", repr(self.subtract))


@register
class Selective(CachePolicy):
    """Selective Attention ("Selective Attention Improves Transformer", arXiv 2410.02703), as a
    cache policy.

    Scoring rule (the paper's section 3): the selection matrix is S = ReLU(one head's logits
    q_i . k_j * scale), zero for a token's own key and for the sequence's first token (which is
    never masked), causal; its accumulation F_ij = sum over the queries i' < i of S_i'j is how
    strongly key j is masked for query i, on every head. The cache keeps each layer's ``budget``
    keys with the least F accumulated so far (score -F; the first token always stays). With
    ``subtract=True`` every head's logits at query i become q_i . k_j * scale - F_ij (the paper's
    selective attention, :meth:`attend`); without it only the pruning applies, training-free."""

    info = ComponentInfo(name="selective", title="Selective Attention Improves Transformer", arxiv="2410.02703",
                         family=("decode",), summary="prune the keys one head's ReLU logits mask most (accumulated)")
    Config = SelectiveConfig
    cumulative = True
    per_head = False  # one head's selection prunes the same tokens on every head

    def selection(self, queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scale: float):
        """Yield (query rows, S (B, rows, Nk) float32) ``chunk`` rows at a time: the selecting head's
        ReLU logits of ``queries`` (B, Hq, Nq, D), the tokens of the last Nq ``keys`` (B, Hkv, Nk,
        D), zero at keys not strictly before the query, at the first real token, at padding
        (``positions`` (B, Hkv, Nk) -1) and for padding queries."""
        head = self.config.head
        if head >= queries.shape[1]:
            raise InvalidArgumentError("head", f"a query head index below {queries.shape[1]}", head)
        kv_head = head // (queries.shape[1] // keys.shape[1])
        nq, nk = queries.shape[2], keys.shape[2]
        real = positions[:, 0] >= 0  # (B, Nk)
        maskable = real & (positions[:, 0] > 0)  # the first real token is never masked
        strictly_before = causal_mask(nq, nk - 1, keys.device)  # query i at key nk - nq + i: keys < its own
        strictly_before = torch.cat([strictly_before, torch.zeros(nq, 1, dtype=torch.bool, device=keys.device)], dim=1)
        key = keys[:, kv_head].float()
        for start in range(0, nq, self.config.chunk):
            rows = slice(start, min(start + self.config.chunk, nq))
            logits = torch.einsum("bqd,bkd->bqk", queries[:, head, rows].float(), key) * scale
            allowed = strictly_before[rows][None] & maskable[:, None, :] & real[:, nk - nq:][:, rows, None]
            yield rows, torch.relu(logits).masked_fill(~allowed, 0.0)

    def accumulate(self, queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        total = sum(s.sum(dim=1) for _, s in self.selection(queries, keys, positions, scale))
        return total[:, None].expand(-1, keys.shape[1], -1)

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               before: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Selective attention of ``queries`` (B, Hq, Nq, D), the tokens of the last Nq ``keys`` (B,
        Hkv, Nk, D) / ``values`` (B, Hkv, Nk, Dv): softmax(q k^T * scale - F) v, F_ij = ``before``
        (B, Nk), the selection earlier calls' queries accumulated, plus that of this call's queries
        before i. Padding keys are hidden (a padding query, never read, sees every key). Returns the
        output (B, Hq, Nq, Dv) and what this call adds to :meth:`accumulate`'s total (B, Hkv, Nk)."""
        allowed = appended_mask(queries.shape[2], positions[:, 0])
        values = repeat_kv(values, queries.shape[1] // keys.shape[1]).float()
        gained, outputs = torch.zeros(before.shape, dtype=torch.float32, device=before.device), []
        for rows, s in self.selection(queries, keys, positions, scale):
            masked = (before + gained)[:, None, :] + s.cumsum(dim=1) - s  # F of each row: the queries before it
            logits = attention_scores(queries[:, :, rows], keys, scale=scale) - masked[:, None]
            outputs.append(torch.matmul(masked_softmax(logits, allowed[:, None, rows]), values))
            gained += s.sum(dim=1)
        return torch.cat(outputs, dim=2).to(queries.dtype), gained[:, None].expand(-1, keys.shape[1], -1)

    def score(self, view: CacheView) -> torch.Tensor:
        return torch.where(view.positions == 0, float("inf"), -view.accumulated)
