"""1-D sliding-window (local) attention with left and right extents."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import InvalidArgumentError, check_int
from ...kernels.block_sparse.builders import range_layout
from ...masks import CausalMask, and_masks, band
from ...method import Call, MethodInfo
from ...registry import register
from .base import PatternMethod


@dataclass
class WindowConfig:
    """``window``: keys each query sees, itself included (causal: the ``window`` most recent; non-causal:
    centred). Or give ``left``/``right`` extents explicitly (keys before / after the query)."""

    window: int | None = None
    left: int | None = None
    right: int | None = None

    def __post_init__(self):
        if self.window is not None and (self.left is not None or self.right is not None):
            raise InvalidArgumentError("window", "either window or left/right extents, not both", f"window={self.window}, left={self.left}, right={self.right}")
        if self.window is None and self.left is None and self.right is None:
            self.window = 512
        if self.window is not None:
            self.window = check_int("window", self.window, minimum=1)
        if self.left is not None:
            self.left = check_int("left", self.left, minimum=0)
        if self.right is not None:
            self.right = check_int("right", self.right, minimum=0)

    def extents(self, causal: bool) -> tuple[int, int]:
        if self.window is None:
            return self.left or 0, self.right or 0
        if causal:
            return self.window - 1, 0
        left = (self.window - 1) // 2
        return left, self.window - 1 - left


@register
class SlidingWindow(PatternMethod):
    """Local attention: query at position p sees keys [p - left, p + right] (Longformer-style local
    band; "Longformer: The Long-Document Transformer", arXiv 2004.05150). Causal calls also drop
    keys after p. Nq != Nk aligns queries bottom-right (query i sits at i + Nk - Nq)."""

    info = MethodInfo(
        name="sliding_window", title="Longformer: The Long-Document Transformer", arxiv="2004.05150",
        family=("local",), causal=True, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(N w D)", memory="O(N w) bools of cached mask, O(N D) tensors",
        summary="1-D window with left/right extents",
    )
    Config = WindowConfig

    def _extents(self, call: Call) -> tuple[int, int]:
        left, right = self.config.extents(call.causal)
        return left, 0 if call.causal else right

    def mask_mod(self, call: Call):
        left, right = self._extents(call)
        off = call.len_kv - call.len_q
        window = band(left, right, off)
        return and_masks(window, CausalMask(off)) if call.causal else window

    def build_layout(self, call: Call):
        left, right = self._extents(call)
        return range_layout(call, self.q_block, lambda p: p - left, lambda p: p + right + 1)

    def reference_mask(self, call: Call) -> torch.Tensor:
        left, right = self._extents(call)
        p = torch.arange(call.len_q, device=call.device)[:, None] + (call.len_kv - call.len_q)
        j = torch.arange(call.len_kv, device=call.device)[None, :]
        return (j - p >= -left) & (j - p <= right)
