"""Single key columns on top of a block layout.

MInference's vertical lines are single key tokens that every query block visits; a layout lists
them in ``columns`` (:class:`~.layout.BlockLayout`). The block executor attends to the listed
blocks, this module to the columns a query block does not already visit through a block, and
:func:`~attnzoo.kernels.dense.merge_attention` joins the two by their log-sum-exp, as split-KV
attention kernels do. Plain torch on any device; gradients flow through both parts.
"""

from __future__ import annotations

import torch

from ..dense import additive_attention_with_lse, additive_mask
from .layout import BlockLayout

_LOGITS = 1 << 22  # query x column logits formed at once (16 MB in float32)


def column_attention(q, k, v, layout: BlockLayout, *, scale: float):
    """Attention of every query to the layout's columns that its block does not already visit,
    where ``mask_mod`` allows. q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) in the
    working dtype -> output (B, Hq, Nq, Dv), log-sum-exp (B, Hq, Nq) (-inf where a row sees no
    column) and the number of allowed (query, column) entries."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    Bl, Hl, C = layout.columns.shape
    batch = torch.arange(B, device=q.device)[:, None]
    heads = torch.arange(Hq, device=q.device)[None, :]
    cols = layout.columns.clamp(min=0).expand(B, Hq, C)
    flat = ((batch * Hkv + heads // (Hq // Hkv)) * Nk)[..., None] + cols  # (B, Hq, C) rows of k viewed (B * Hkv * Nk, D)
    kc = k.reshape(-1, D)[flat]  # (B, Hq, C, D)
    vc = v.reshape(-1, v.shape[-1])[flat]
    visits = layout.column_visits()  # (Bl, Hl, nQB, C)
    lb = torch.arange(Bl, device=q.device).view(-1, 1, 1, 1)
    lh = torch.arange(Hl, device=q.device).view(1, -1, 1, 1)
    step = max(layout.q_block, _LOGITS // max(1, B * Hq * C) // layout.q_block * layout.q_block)
    outs, lses, allowed = [], [], 0
    for a in range(0, Nq, step):
        rows = torch.arange(a, min(a + step, Nq), device=q.device)
        keep = visits[:, :, rows // layout.q_block] & layout.token_mask(rows[:, None], layout.columns[:, :, None, :], lb, lh)
        allowed += int(torch.count_nonzero(keep)) * (B // Bl) * (Hq // Hl)
        out, lse = additive_attention_with_lse(q[:, :, rows], kc, vc, additive_mask(keep, q.dtype), scale=scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2), allowed
