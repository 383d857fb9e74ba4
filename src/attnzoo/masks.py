"""Masks as small pure functions ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` (the FlexAttention
form) and the combinators that build patterns from them (attention-gym style).

Indices are original token positions; causal masks are aligned bottom-right when Nq != Nk (query i
sits at position i + Nk - Nq), the convention of every executor here."""

from __future__ import annotations

import torch

from .method import Call


def causal_allowed(call: Call, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """Bottom-right aligned causality on original indices (query i sits at i + Nk - Nq)."""
    return kv_idx <= q_idx + (call.len_kv - call.len_q)
