"""Attention a cache layer computes itself, over one KV head's stored keys (ragged and DiffQKV layers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.dense import causal_mask, fold_heads


def appended_mask(nq: int, positions: torch.Tensor) -> torch.Tensor:
    """(B, Nq, S) bool: which of the S stored keys (``positions`` (B, S), -1 padding) each of the
    last Nq of them, the call's queries, sees: real keys, causally; a row that sees no key (a
    padding query, never read) sees every key."""
    allowed = causal_mask(nq, positions.shape[-1], positions.device)[None] & (positions >= 0)[:, None, :]
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def head_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scale: float,
                   v_top: int | None = None) -> torch.Tensor:
    """(B, G, Nq, Dv) attention of one KV head's query group ``queries`` (B, G, Nq, D), the tokens
    of the last Nq of its ``keys`` (B, S, D) / ``values`` (B, S, Dv), folded as G * Nq rows (keys
    not copied per query head). Keys with ``positions`` (B, S) -1 are hidden, the appended ones
    causally; a row that sees no key (a padding query, never read) attends to every key.
    ``v_top``: each row's softmax runs over its ``v_top`` highest logits only and reads only those
    keys' values (Sigma's selective V loading); None: every key."""
    batch, groups, nq, _ = queries.shape
    stored = keys.shape[1]
    if nq == 1 and not bool((positions < 0).any()):
        allowed = None
    else:
        allowed = appended_mask(nq, positions)[:, None]  # (B, 1, Nq, S), shared by the group
    rows, mask = fold_heads(queries, allowed, groups)  # (B, 1, G * Nq, D), (B, 1, G * Nq, S)
    if v_top is None or v_top >= stored:
        out = F.scaled_dot_product_attention(rows, keys[:, None], values[:, None], attn_mask=mask, scale=scale)[:, 0]
    else:
        rows, allowed = rows[:, 0], None if mask is None else mask[:, 0]
        logits = torch.matmul(rows, keys.transpose(1, 2)) * scale
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        top, index = logits.topk(v_top, dim=-1)  # (B, G * Nq, v_top)
        weights = torch.softmax(top, dim=-1)
        chosen = values[:, None].expand(batch, groups * nq, stored, values.shape[-1]).gather(
            2, index[..., None].expand(*index.shape, values.shape[-1]))
        out = torch.matmul(weights[:, :, None], chosen)[:, :, 0]
    return out.reshape(batch, groups, nq, -1)
