"""Masks as small pure functions ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` (the FlexAttention
form) and the combinators that build patterns from them (attention-gym style).

Indices are original token positions and broadcast against each other (the executors pass
index tensors of any shape); causal masks are aligned bottom-right when Nq != Nk (query i sits at
position i + Nk - Nq), the convention of every executor here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .method import Call

MaskMod = Callable[[object, object, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CausalMask:
    """Bottom-right aligned causality as a ``mask_mod``: key j is allowed for query i iff
    j <= i + offset (offset = Nk - Nq). The one definition of causality here: the block executor
    recognises it and classifies tiles without evaluating it, and :func:`causal_allowed` and
    :func:`attnzoo.kernels.dense.causal_mask` are built on it."""

    offset: int

    def __call__(self, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + self.offset


def causal_allowed(call: Call, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """Causality of a call on original indices (query i sits at i + Nk - Nq)."""
    return CausalMask(call.len_kv - call.len_q)(0, 0, q_idx, kv_idx)


def band(left, right, offset: int = 0) -> MaskMod:
    """Keys within ``left`` before and ``right`` after the query's position q + ``offset`` (both
    inclusive); ``left`` / ``right`` may be per-head tensors (H,), indexed by the head index."""

    def mask_mod(b, h, q_idx, kv_idx):
        lo = left[h] if isinstance(left, torch.Tensor) else left
        hi = right[h] if isinstance(right, torch.Tensor) else right
        p = q_idx + offset
        return (kv_idx >= p - lo) & (kv_idx <= p + hi)

    return mask_mod


def sink_tokens(count: int) -> MaskMod:
    """The first ``count`` keys, for every query (attention sinks, StreamingLLM)."""
    return lambda b, h, q_idx, kv_idx: kv_idx < count


def _combine(mask_mods: tuple[MaskMod, ...], join, name: str) -> MaskMod:
    if not mask_mods:
        raise ValueError(f"{name} needs at least one mask_mod")

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = mask_mods[0](b, h, q_idx, kv_idx)
        for other in mask_mods[1:]:
            allowed = join(allowed, other(b, h, q_idx, kv_idx))
        return allowed

    return mask_mod


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask_mod allowing (q, kv) where every one of ``mask_mods`` allows it."""
    return _combine(mask_mods, torch.logical_and, "and_masks")


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask_mod allowing (q, kv) where any one of ``mask_mods`` allows it."""
    return _combine(mask_mods, torch.logical_or, "or_masks")


def evaluate(mask_mod: MaskMod, heads: int, len_q: int, len_kv: int, device=None) -> torch.Tensor:
    """The dense (heads, Nq, Nk) boolean mask of ``mask_mod`` (batch index 0): O(H Nq Nk) memory,
    for references, tests and the full-graph path under ``torch.compile``."""
    h = torch.arange(heads, device=device)[:, None, None]
    q_idx = torch.arange(len_q, device=device)[None, :, None]
    kv_idx = torch.arange(len_kv, device=device)[None, None, :]
    return torch.as_tensor(mask_mod(0, h, q_idx, kv_idx), device=device).expand(heads, len_q, len_kv)
