"""FlexAttention backend: the layout becomes a ``BlockMask`` built from its block lists directly
(``BlockMask.from_kv_blocks``), so no N x N mask is ever evaluated; compiled once per shape."""

from __future__ import annotations

import functools

import torch

from .layout import BlockLayout, present_ids


@functools.cache
def available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def can_run(q, k, v, layout: BlockLayout) -> str | None:
    """None when FlexAttention is available (it runs every layout); else why not."""
    return None if available() else "torch.nn.attention.flex_attention is not available in this torch"


@functools.lru_cache(maxsize=None)
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_mask(layout: BlockLayout):
    """The layout as a FlexAttention ``BlockMask`` (in the layout's visiting order)."""
    from torch.nn.attention.flex_attention import BlockMask

    key = "flex_block_mask"
    if key in layout.cache:
        return layout.cache[key]
    inner = layout.mask_mod
    qo = layout.q_order if layout.q_order is not None else torch.arange(layout.num_q, device=layout.device)
    ko = layout.kv_order if layout.kv_order is not None else torch.arange(layout.num_kv, device=layout.device)
    qb, kb, shared_b, shared_h = layout.q_block, layout.kv_block, layout.kv_indices.shape[0] == 1, layout.kv_indices.shape[1] == 1
    listed = column = None
    counts, indices = layout.kv_counts, layout.kv_indices
    if not layout.covers_mask:
        # A selection layout: the listed blocks are part of the pattern. Compiled flex skips unlisted
        # blocks, but eager flex (the CPU path) applies mask_mod alone, so the mask checks them too.
        listed = layout.block_visits()
    if layout.columns is not None:
        # single key columns: every block holding one is visited, and the mask keeps the column's token
        column = layout.column_tokens()
        holding = torch.nn.functional.pad(column, (0, -layout.num_kv % kb)).unflatten(-1, (-1, kb)).any(-1)
        visit = listed | holding[:, :, None, :]
        indices, counts = present_ids(visit)

    def mask_mod(b, h, q_idx, kv_idx):
        # the layout's own batch/head index is 0 where it is shared by every batch row/head
        b, h = (b * 0 if shared_b else b), (h * 0 if shared_h else h)
        allowed = q_idx >= 0
        if inner is not None:
            allowed = allowed & inner(b, h, qo[q_idx].clamp(min=0), ko[kv_idx])
        if listed is not None:
            visited = listed[b, h, q_idx // qb, kv_idx // kb]
            if column is not None:
                visited = visited | column[b, h, kv_idx]
            allowed = allowed & visited
        return allowed

    # FlexAttention sizes its block table by the last axis of kv_indices: pad it to all key blocks
    indices = indices.to(torch.int32)
    indices = torch.nn.functional.pad(indices, (0, layout.num_kv_blocks - indices.shape[-1]))
    bm = BlockMask.from_kv_blocks(
        counts.to(torch.int32),
        indices,
        BLOCK_SIZE=(layout.q_block, layout.kv_block),
        mask_mod=mask_mod,
        seq_lengths=(layout.num_q, layout.num_kv),
    )
    layout.cache[key] = bm
    return bm


def flex_block_sparse(q, k, v, layout: BlockLayout, *, scale: float, compile: bool = True, return_lse: bool = False):
    """Block-sparse attention through ``flex_attention``; q (B,Hq,Nq,D), k/v (B,Hkv,Nk,D|Dv) ->
    (B,Hq,Nq,Dv) and, with ``return_lse``, each row's natural log-sum-exp (B,Hq,Nq) float32
    (FlexAttention's own; -inf for rows with no key), else None."""
    from torch.nn.attention.flex_attention import flex_attention

    bm = block_mask(layout)
    len_q = q.shape[2]
    if layout.q_order is not None:
        q = q[:, :, layout.q_order.clamp(min=0)]
    if layout.kv_order is not None:
        k, v = k[:, :, layout.kv_order], v[:, :, layout.kv_order]
    fn = _compiled() if compile else flex_attention
    gqa = q.shape[1] != k.shape[1]
    result = fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa, **_lse_request(return_lse))
    out, lse = (result[0], _lse_of(result[1])) if return_lse else (result, None)
    if layout.q_order is not None:
        real = layout.q_order >= 0
        full = out.new_zeros(out.shape[0], out.shape[1], len_q, out.shape[3])
        full[:, :, layout.q_order[real]] = out[:, :, real]
        out = full
        if return_lse:
            full_lse = lse.new_full((*lse.shape[:2], len_q), float("-inf"))
            full_lse[:, :, layout.q_order[real]] = lse[:, :, real]
            lse = full_lse
    return out, lse


def _lse_request(return_lse: bool) -> dict:
    """flex_attention's keyword asking for the log-sum-exp (``return_aux`` where this torch has it)."""
    if not return_lse:
        return {}
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch before AuxRequest
        return {"return_lse": True}
    return {"return_aux": AuxRequest(lse=True)}


def _lse_of(aux):
    """The log-sum-exp from flex_attention's second output (an ``AuxOutput`` or the tensor itself)."""
    return aux if isinstance(aux, torch.Tensor) else aux.lse
