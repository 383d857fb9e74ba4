"""2-D box executor: every query tile against its box of keys, read through strided views, no gather.

For a row of query tiles, the keys of all their boxes lie in one strip of grid rows. Copied once in
column-major order, the strip holds each tile's box (all strip rows x a run of columns) as one
contiguous run, and consecutive tiles' boxes are overlapping windows of a single ``as_strided`` view.
So K and V are copied about (box height / tile height) times instead of (box area / tile area) times
by a gather; for a 13 x 13 neighborhood on 8 x 8 tiles that is 2.5x instead of 6.25x.
Tiles sharing a token mask and a regular column stride run as one SDPA call with one broadcast mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..dense import (
    additive_attention_with_lse,
    additive_mask,
    executor_dtype,
    work_dtype,
)
from .layout import BlockLayout


@dataclass(frozen=True)
class Boxes2D:
    """Geometry of a tiled 2-D layout: grid (R, C) row-major, tiles (tr, tc) dividing it, and for
    each tile row / tile column the first key row / column of its box (boxes are box_h x box_w)."""

    grid: tuple[int, int]
    tile: tuple[int, int]
    row_start: tuple[int, ...]
    box_h: int
    col_start: tuple[int, ...]
    box_w: int


@dataclass
class _Run:
    first: int  # first tile column of the run
    stop: int
    col0: int  # first key column of the first tile's box
    mask: torch.Tensor | None  # additive (G * tc * tr, box_w * box_h), rows ordered (col, group, row)
    allowed: int = 0  # allowed (query, key) entries of one tile of the run, for one head


def _runs(layout: BlockLayout, boxes: Boxes2D, groups: int, dtype: torch.dtype) -> list[list[_Run]]:
    key = ("strip", groups, dtype)
    if key in layout.cache:
        return layout.cache[key]
    (_, C), (tr, tc), bh, bw = boxes.grid, boxes.tile, boxes.box_h, boxes.box_w
    dev = layout.device
    zero = torch.zeros((), dtype=torch.long, device=dev)
    col_start = torch.tensor(boxes.col_start, device=dev)
    qc = torch.arange(len(boxes.col_start), device=dev)[:, None] * tc + torch.arange(tc, device=dev)  # (nc, tc)
    kc = col_start[:, None] + torch.arange(bw, device=dev)  # (nc, bw)
    # a run continues while the box moves by one tile width and the token mask repeats
    steps = (col_start[1:] - col_start[:-1]) == tc
    rows = []
    for ti, r0 in enumerate(boxes.row_start):
        qr = ti * tr + torch.arange(tr, device=dev)
        kr = r0 + torch.arange(bh, device=dev)
        q_idx = (qr[None, None, :] * C + qc[:, :, None]).flatten(1)  # (nc, tc * tr), (col, row) order
        k_idx = (kr[None, None, :] * C + kc[:, :, None]).flatten(1)
        masks = layout.token_mask(q_idx[:, :, None], k_idx[:, None, :], zero, zero)  # (nc, tc * tr, bw * bh)
        joins = (steps & (masks[1:] == masks[:-1]).flatten(1).all(1)).tolist()
        runs = [_Run(0, 1, boxes.col_start[0], None)]
        for tj, join in enumerate(joins, start=1):
            if join:
                runs[-1].stop = tj + 1
            else:
                runs.append(_Run(tj, tj + 1, boxes.col_start[tj], None))
        for run in runs:
            m = masks[run.first]
            run.allowed = int(m.sum())
            if not bool(m.all()):
                m = m.view(tc, 1, tr, -1).expand(tc, groups, tr, m.shape[-1]).reshape(-1, m.shape[-1])
                run.mask = additive_mask(m, dtype)
        rows.append(runs)
    layout.cache[key] = rows
    return rows


def can_run(q, k, v, layout: BlockLayout) -> str | None:
    """None when this executor runs ``layout`` (2-D boxes shared by every batch row and head, over
    the whole grid); else why not."""
    boxes = layout.boxes
    if boxes is None:
        return "the layout has no 2-D boxes"
    if layout.kv_indices.shape[:2] != (1, 1):
        return "the layout differs between batch rows or heads"
    if not q.shape[2] == k.shape[2] == boxes.grid[0] * boxes.grid[1]:
        return f"Nq = {q.shape[2]}, Nk = {k.shape[2]} are not the {boxes.grid} grid's tokens"
    return None


def strip_attention(q, k, v, layout: BlockLayout, *, scale: float, return_lse: bool = False):
    """q (B, Hq, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv) with N = R * C -> (B, Hq, N, Dv), each
    row's log-sum-exp (B, Hq, N) with ``return_lse`` (else None), and the counts of allowed and
    computed (query, key) entries.

    Without autograd, the strip and query buffers are allocated once per call and refilled per tile
    row: a fresh allocation of this size is a fresh mmap on Linux, whose page faults cost more than
    the copy. With autograd each row gets its own buffers (the backward pass reads them).
    """
    boxes = layout.boxes
    B, Hq, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    G = Hq // Hkv
    (R, C), (tr, tc), bh, bw = boxes.grid, boxes.tile, boxes.box_h, boxes.box_w
    work = executor_dtype(q)
    q6 = q.to(work).view(B, Hkv, G, R, C, D)
    k5, v5 = k.to(work).view(B, Hkv, R, C, D), v.to(work).view(B, Hkv, R, C, Dv)
    out = torch.empty(B, Hkv, G, R, C, Dv, dtype=work, device=q.device)
    lse = torch.empty(B, Hkv, G, R, C, dtype=work_dtype(q), device=q.device) if return_lse else None
    nc = C // tc
    reuse = not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))

    def buffers():
        return (
            torch.empty(B, Hkv, C, bh, D, dtype=work, device=q.device),  # column-major strip: a tile's box is one run
            torch.empty(B, Hkv, C, bh, Dv, dtype=work, device=q.device),
            torch.empty(B, Hkv, C, G, tr, D, dtype=work, device=q.device),  # queries ordered (column, group, row)
        )

    ks, vs, qs = buffers()
    allowed = 0
    for ti, runs in enumerate(_runs(layout, boxes, G, work)):
        r0 = boxes.row_start[ti]
        if ti and not reuse:
            ks, vs, qs = buffers()
        ks.copy_(k5[:, :, r0 : r0 + bh].transpose(2, 3))
        vs.copy_(v5[:, :, r0 : r0 + bh].transpose(2, 3))
        qs.copy_(q6[:, :, :, ti * tr : (ti + 1) * tr].permute(0, 1, 4, 2, 3, 5))
        q_tiles = qs.view(B * Hkv, nc, tc * G * tr, D)
        dest = out[:, :, :, ti * tr : (ti + 1) * tr].view(B * Hkv, G, tr, nc, tc, Dv)
        for run in runs:
            n = run.stop - run.first
            kb = ks.as_strided((B * Hkv, n, bw * bh, D), (C * bh * D, tc * bh * D, D, 1), run.col0 * bh * D)
            vb = vs.as_strided((B * Hkv, n, bw * bh, Dv), (C * bh * Dv, tc * bh * Dv, Dv, 1), run.col0 * bh * Dv)
            if return_lse:
                res, res_lse = additive_attention_with_lse(q_tiles[:, run.first : run.stop], kb, vb, run.mask, scale=scale)
                lse_dest = lse[:, :, :, ti * tr : (ti + 1) * tr].view(B * Hkv, G, tr, nc, tc)
                lse_dest[:, :, :, run.first : run.stop] = res_lse.view(B * Hkv, n, tc, G, tr).permute(0, 3, 4, 1, 2)
            else:
                res = F.scaled_dot_product_attention(q_tiles[:, run.first : run.stop], kb, vb, attn_mask=run.mask, scale=scale)
            dest[:, :, :, run.first : run.stop] = res.view(B * Hkv, n, tc, G, tr, Dv).permute(0, 3, 4, 1, 2, 5)
            allowed += n * run.allowed
    computed = R * C * bh * bw
    heads = B * Hq
    counts = {"allowed": allowed * heads, "computed": computed * heads}
    return out.view(B, Hq, N, Dv).to(q.dtype), None if lse is None else lse.view(B, Hq, N), counts
