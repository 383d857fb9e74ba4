"""Literal selections of the learned sparse methods, written from the papers: what their
``.reference`` computes. Plain loops over batches, heads and blocks, sharing no code with the fast
paths (the gate modules, ``_select``); the only things read from a method are its learned
parameters and its configuration (state, not rule). Slow: meant for tests and short inputs.
Queries align bottom-right with the keys when causal.
"""

from __future__ import annotations

import math

import torch

from ..dynamic.naive import always_visited, block_support, diagonal_block, support_reference, top_keys
from ..linear.naive import expand_heads


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Half-split rotary embedding as complex numbers: x (n, G), channel pair (i, i + G/2) taken as
    x_i + i x_(i+G/2) and multiplied by e^(i p base^(-2i/G)) at position p (``positions`` (n,))."""
    half = x.shape[-1] // 2
    pairs = torch.complex(x[..., :half], x[..., half:])
    angles = positions[:, None] * base ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    turned = pairs * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([turned.real, turned.imag], dim=-1)


@torch.no_grad()
def attn_gate_probabilities(q, k, *, query_map: torch.Tensor, key_map: torch.Tensor, rope_base: float, block_size: int,
                            causal: bool) -> torch.Tensor:
    """SeerAttention's AttnGate (arXiv 2410.13276, Sec. 3.1) on q (B, Hq, Nq, D), k (B, Hkv, Nk, D):
    per query block the mean of its queries, per key block the max, min and mean of its keys
    (concatenated; a ragged last block over its own tokens), head h's linear maps ``query_map[h]``
    (D, G) and ``key_map[h]`` (3D, G), rotary embeddings at block positions (query block i at
    i + (Nk - Nq) / block_size), logits ``gq . gk / sqrt(G)`` and their softmax over the key blocks
    the query block may see (the others, and rows that see none, 0). (B, Hq, nQB, nKB) float64."""
    B, H, nq, _ = q.shape
    q, k = q.detach().double(), expand_heads(k.detach().double(), H)
    nk, b = k.shape[2], block_size
    nqb, nkb = math.ceil(nq / b), math.ceil(nk / b)
    width = query_map.shape[-1]
    query_positions = torch.arange(nqb, dtype=torch.float64, device=q.device) + (nk - nq) / b
    key_positions = torch.arange(nkb, dtype=torch.float64, device=q.device)
    probs = torch.zeros(B, H, nqb, nkb, dtype=torch.float64, device=q.device)
    for bi in range(B):
        for h in range(H):
            pooled_q = torch.stack([q[bi, h, i * b : (i + 1) * b].mean(0) for i in range(nqb)])
            key_blocks = [k[bi, h, j * b : (j + 1) * b] for j in range(nkb)]
            pooled_k = torch.stack([torch.cat([x.amax(0), x.amin(0), x.mean(0)]) for x in key_blocks])
            gq = rotary(pooled_q @ query_map[h].detach().double(), query_positions, rope_base)
            gk = rotary(pooled_k @ key_map[h].detach().double(), key_positions, rope_base)
            for i in range(nqb):
                last = diagonal_block(i, b, nq, nk, causal, b)
                if last >= 0:
                    probs[bi, h, i, : last + 1] = torch.softmax(gk[: last + 1] @ gq[i] / math.sqrt(width), 0)
    return probs


@torch.no_grad()
def seer_support(q, k, *, query_map: torch.Tensor, key_map: torch.Tensor, rope_base: float, block_size: int, top_k: int,
                 threshold: float | None, local_blocks: int, causal: bool) -> torch.Tensor:
    """SeerAttention's selection (arXiv 2410.13276, Sec. 3): each query block keeps the blocks it
    always visits (its diagonal, the first block and the ``local_blocks`` before the diagonal when
    causal; the first block otherwise), counted in ``top_k``, and fills ``top_k`` with the key blocks
    of highest gate probability (:func:`attn_gate_probabilities`); with ``threshold``, every visible
    block whose probability reaches it instead of ``top_k``. (B, Hq, Nq, Nk) bool."""
    probs = attn_gate_probabilities(q, k, query_map=query_map, key_map=key_map, rope_base=rope_base, block_size=block_size,
                                    causal=causal)
    B, H, nqb, _ = probs.shape
    nq, nk, b = q.shape[2], k.shape[2], block_size
    blocks = {}
    for bi in range(B):
        for h in range(H):
            for i in range(nqb):
                last = diagonal_block(i, b, nq, nk, causal, b)
                forced = always_visited(last, causal, local_blocks)
                score = {j: float(probs[bi, h, i, j]) for j in range(last + 1) if j not in forced}
                if threshold is None:
                    kept = forced[:top_k]
                    blocks[bi, h, i] = kept + top_keys(score, top_k - len(kept))
                else:
                    blocks[bi, h, i] = forced + [j for j, p in score.items() if p >= threshold]
    return block_support(blocks, (B, H, nq, nk), b, causal, b)


def seer_reference(q, k, v, gate, config, *, causal: bool, scale: float) -> torch.Tensor:
    """Exact softmax attention of q (B, Hq, Nq, D) over k, v (B, Hkv, Nk, D|Dv) on the blocks
    :func:`seer_support` keeps, with the learned maps of ``gate`` (an AttnGate: ``query``,
    ``key``, ``rope_base``) and ``config``'s ``block_size``, ``top_k``, ``threshold`` and
    ``local_blocks``; (B, Hq, Nq, Dv) in q's dtype."""
    support = seer_support(q, k, query_map=gate.query, key_map=gate.key, rope_base=gate.rope_base,
                           block_size=config.block_size, top_k=config.top_k, threshold=config.threshold,
                           local_blocks=config.local_blocks, causal=causal)
    return support_reference(q, k, v, support, scale)
