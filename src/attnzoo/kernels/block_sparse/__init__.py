"""The shared block-sparse executor: one entry point, a backend chosen per device behind it.

Backends: ``gather`` (fused SDPA per block group, 2-D boxes through strided views, block-granular
layouts through :mod:`.blocks`; the fastest on CPU), ``flex`` (compiled
FlexAttention with a BlockMask built from the block lists; the default on GPU), ``naive`` (dense
reference with the materialised mask; tests only).
"""

from __future__ import annotations

import torch

from ...errors import InvalidArgumentError
from .blocks import CausalMask, block_attention, handles
from .flex import flex_block_sparse
from .gather import gather_attention
from .layout import BlockLayout, MaskMod, membership, present_ids
from .naive import naive_block_sparse
from .strip import Boxes2D, strip_attention

BACKENDS = ("auto", "gather", "flex", "naive")

__all__ = ["BACKENDS", "BlockLayout", "Boxes2D", "CausalMask", "MaskMod", "block_sparse_attention", "choose_backend", "membership", "present_ids"]


def choose_backend(requested: str, device: torch.device) -> str:
    """``auto`` -> ``flex`` on CUDA, ``gather`` elsewhere; an explicit choice is kept."""
    if requested not in BACKENDS:
        raise InvalidArgumentError("backend", f"one of {BACKENDS}", repr(requested))
    if requested != "auto":
        return requested
    return "flex" if device.type == "cuda" else "gather"


def block_sparse_attention(q, k, v, layout: BlockLayout, *, scale: float, backend: str = "auto", static: bool = True):
    """Attention restricted to ``layout``: q (B,Hq,Nq,D), k (B,Hkv,Nk,D), v (B,Hkv,Nk,Dv) -> (B,Hq,Nq,Dv).

    ``static`` layouts (fixed by positions) cache their execution plan. Rows with no allowed key
    return zeros. Returns the output and the counts of allowed and computed (query, key) entries.
    """
    backend = choose_backend(backend, q.device)
    if backend == "gather":
        if layout.boxes is not None and layout.kv_indices.shape[:2] == (1, 1):
            return strip_attention(q, k, v, layout, layout.boxes, scale=scale)
        if handles(layout):
            return block_attention(q, k, v, layout, scale=scale, static=static)
        if layout.columns is not None:
            raise ValueError("block_sparse_attention: layouts with columns need key blocks of more than one token")
        return gather_attention(q, k, v, layout, scale=scale, static=static)
    if backend == "flex":
        out = flex_block_sparse(q, k, v, layout, scale=scale, compile=q.device.type == "cuda")
    else:
        out = naive_block_sparse(q, k, v, layout, scale=scale)
    n = q.shape[0] * q.shape[1]
    visited = float(layout.kv_counts.float().sum(-1).mean()) * layout.q_block * layout.kv_block * layout.num_q_blocks
    return out, {"allowed": None, "computed": int(visited * n)}
