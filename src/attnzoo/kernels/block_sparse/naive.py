"""Reference block-sparse attention: materialise the layout's N x N mask and run dense softmax."""

from __future__ import annotations

import torch

from ..dense import masked_attention
from .layout import BlockLayout


def naive_block_sparse(q, k, v, layout: BlockLayout, *, scale: float) -> torch.Tensor:
    """Same contract as the fast executors; O(N^2) memory, for tests and small inputs only."""
    return masked_attention(q, k, v, layout.dense_mask(q.shape[2], k.shape[2]), scale=scale)
