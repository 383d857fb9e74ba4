"""Literal patterns, written here, of the content-selected methods whose package has no literal
reference of its own (``s2``, a local method whose ``.reference`` runs its pattern): plain loops,
no code shared with the fast paths. The dynamic methods' literal selections live beside them in
``attnzoo/methods/dynamic/naive.py`` and are what their ``.reference`` runs. A ``*_support``
returns the (B, Hq, Nq, Nk) boolean support, which :func:`attend` turns into exact attention.
"""

from __future__ import annotations

import torch
from fidelity.quadratic import expand_heads


def attend(q, k, v, support: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact softmax attention of q (B, Hq, Nq, D) over the keys ``support`` allows (float64);
    a query with no allowed key gets zeros."""
    k, v = expand_heads(k.double(), q.shape[1]), expand_heads(v.double(), q.shape[1])
    logits = (q.double() @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~support, float("-inf"))
    weights = torch.softmax(logits, -1).nan_to_num(0.0)
    return weights @ v


def sees(p: int, j: int, nq: int, nk: int, causal: bool) -> bool:
    """Query p may see key j: always, or when causal with queries aligned bottom-right."""
    return not causal or j <= p + nk - nq


# ---- S2-Attention ------------------------------------------------------------------------------
def s2_support(q, k, *, block_size: int, local_blocks: int, vert_stride: int, causal: bool, scale: float):
    """DKernel's local-stride pattern as S2-Attention shards it: head h sees the ``local_blocks``
    key blocks nearest its query's block and every key block kb with
    (kb + h * max(1, vert_stride // H) + 1) % vert_stride == 0, so the heads hold different strided
    shards of the context."""
    B, H, nq, _ = q.shape
    nk, b = k.shape[2], block_size
    support = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    step = max(1, vert_stride // H)
    for h in range(H):
        for p in range(nq):
            pos = p + nk - nq
            for j in range(nk):
                near = 0 <= pos // b - j // b < local_blocks if causal else abs(pos // b - j // b) < local_blocks
                shard = (j // b + h * step + 1) % vert_stride == 0
                support[:, h, p, j] = (near or shard) and sees(p, j, nq, nk, causal)
    return support
