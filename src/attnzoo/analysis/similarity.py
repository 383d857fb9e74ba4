"""Similarity of attention maps across layers and heads, the measurement behind EchoAtt
(Rajabzadeh et al., 2024), which shares attention maps between layers whose maps agree.

Two metrics: ``"cosine"``, the cosine of the two flattened (Nq, Nk) maps, and ``"js"``, one minus
the Jensen-Shannon divergence (base 2, so in [0, 1]) between matching query rows, averaged over
the rows. Both are 1 for identical maps; batch items are compared item by item and averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InvalidArgumentError
from ._checks import check_layers

METRICS = ("cosine", "js")


def _cosine(flat: torch.Tensor) -> torch.Tensor:
    """(B, M, F) maps -> (M, M) cosine similarity, batch mean."""
    unit = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return (unit @ unit.transpose(1, 2)).mean(dim=0)


def _js_similarity(rows: torch.Tensor) -> torch.Tensor:
    """(B, M, Nq, Nk) maps -> (M, M) one minus the row-mean Jensen-Shannon divergence (bits), batch mean."""
    m = rows.shape[1]
    out = torch.empty(m, m, dtype=rows.dtype, device=rows.device)

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log2(p.clamp_min(1e-30))).sum(dim=-1)

    own = entropy(rows)  # (B, M, Nq)
    for i in range(m):
        mixed = entropy(0.5 * (rows[:, i:i + 1] + rows))  # (B, M, Nq)
        divergence = (mixed - 0.5 * (own[:, i:i + 1] + own)).clamp(0.0, 1.0)
        out[i] = 1.0 - divergence.mean(dim=(0, 2))
    return out


def head_similarity(maps: Sequence[torch.Tensor], *, metric: str = "cosine") -> torch.Tensor:
    """(L, H, L, H) similarity of every head's map to every other's; ``maps``: one (B?, H, Nq, Nk)
    probability tensor per layer, all of one shape. ``[l, h, m, g]`` compares head h of layer l with
    head g of layer m; the tensor is symmetric and its diagonal is 1."""
    layers = check_layers("maps", maps)
    if metric not in METRICS:
        raise InvalidArgumentError("metric", f"one of {METRICS}", repr(metric))
    stacked = torch.stack([m.double() for m in layers], dim=1)  # (B, L, H, Nq, Nk)
    b, n_layers, heads, nq, nk = stacked.shape
    flat = stacked.reshape(b, n_layers * heads, nq, nk)
    sim = _cosine(flat.reshape(b, n_layers * heads, nq * nk)) if metric == "cosine" else _js_similarity(flat)
    return sim.float().reshape(n_layers, heads, n_layers, heads)


def layer_similarity(maps: Sequence[torch.Tensor], *, metric: str = "cosine") -> torch.Tensor:
    """(L, L) similarity of layers: the similarity of head h of one layer with head h of the other
    (:func:`head_similarity`), averaged over heads. EchoAtt's candidates for sharing are the
    neighbouring layers with high values."""
    full = head_similarity(maps, metric=metric)
    return torch.diagonal(full, dim1=1, dim2=3).mean(dim=-1)
