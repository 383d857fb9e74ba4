"""References for spatial methods inside real models: the model's own attention under an explicit mask
written from token coordinates (shares no code with attnzoo's layouts or executors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class MaskedSDPA(TorchFunctionMode):
    """Runs every self-attention SDPA call (Nq == Nk) under ``mask_for(n)`` (n tokens -> (n, n) bool,
    True = attend); cross-attention calls run unchanged."""

    def __init__(self, mask_for):
        super().__init__()
        self.mask_for = mask_for

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        call = {**dict(zip(SDPA_ARGS, args)), **(kwargs or {})}
        n = call["query"].shape[2]
        if call["key"].shape[2] == n:
            assert call.get("attn_mask") is None, "the reference replaces no mask of the model's"
            call["attn_mask"] = self.mask_for(n).to(call["query"].device)
        return F.scaled_dot_product_attention(**call)


def neighborhood_mask(n: int, grid: tuple[int, int], text: int, text_last: bool = False, kernel: int = 3) -> torch.Tensor:
    """(n, n): a ``kernel`` x ``kernel`` neighbourhood on the row-major ``grid`` of n - text image
    tokens, windows shifted inside the grid at its borders (NATTEN's rule), the ``text`` other tokens
    (text or CLS / register tokens) global; they sit first, or last (``text_last``, SD3)."""
    rows, cols = grid
    assert rows * cols == n - text, (grid, n, text)
    r, c = torch.arange(rows * cols) // cols, torch.arange(rows * cols) % cols
    half = kernel // 2
    start_r, start_c = (r - half).clamp(0, rows - kernel), (c - half).clamp(0, cols - kernel)
    image = ((r[None, :] >= start_r[:, None]) & (r[None, :] < start_r[:, None] + kernel)
             & (c[None, :] >= start_c[:, None]) & (c[None, :] < start_c[:, None] + kernel))
    mask = torch.ones(n, n, dtype=torch.bool)
    span = slice(0, n - text) if text_last else slice(text, n)
    mask[span, span] = image
    return mask
