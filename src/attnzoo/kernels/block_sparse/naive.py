"""Reference block-sparse attention: materialise the layout's N x N mask and run dense softmax."""

from __future__ import annotations

from ..dense import attention_with_lse, masked_attention
from .layout import BlockLayout


def can_run(q, k, v, layout: BlockLayout) -> str | None:
    """The reference runs every layout (O(N^2) memory)."""
    return None


def naive_block_sparse(q, k, v, layout: BlockLayout, *, scale: float, return_lse: bool = False):
    """Same contract as the fast executors: the output (B, Hq, Nq, Dv) and, with ``return_lse``,
    each row's log-sum-exp (B, Hq, Nq) (else None); for tests and small inputs only."""
    mask = layout.dense_mask(q.shape[2], k.shape[2])
    if return_lse:
        return attention_with_lse(q, k, v, scale=scale, mask=mask)
    return masked_attention(q, k, v, mask, scale=scale), None
