"""Padding masks: run attention on each sequence's unpadded span, refuse every other mask.

transformers hands the attention function a (B|1, 1, Nq, Nk) mask built from a 2-D padding mask
(boolean for SDPA, 0 / -inf for eager). attnzoo methods take no mask, so a padded batch runs one
sequence at a time on its span of valid tokens; masks that are not padding (packed sequences,
custom 4-D masks) are refused rather than silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...errors import UnsupportedError
from ...kernels.dense import causal_mask, work_dtype

NOT_PADDING = ("attnzoo patch: the attention mask is not causal/bidirectional attention over one contiguous span of "
               "unpadded tokens per sequence (packed sequences or custom masks); only padding is supported")


def bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean (True = attend) or additive 0 / -inf mask as a boolean mask of the same shape."""
    if mask.dtype == torch.bool:
        return mask
    allowed = mask == 0
    if not bool((allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
        raise UnsupportedError("attnzoo patch: the model passed an additive attention bias; only 0/-inf masks (padding) are supported")
    return allowed


def sequence_spans(mask: torch.Tensor | None, batch: int, len_q: int, len_kv: int,
                   causal: bool) -> list[tuple[int, slice, slice]] | None:
    """None when ``mask`` (B|1, 1, Nq|1, Nk) or None masks nothing beyond the causal (or full)
    pattern; else (sequence, query span, key span) for each of the ``batch`` sequences with a valid token.

    Queries are bottom-right aligned (query i sits at key position i + Nk - Nq). Raises
    :class:`UnsupportedError` for a mask that is not that pattern restricted to one contiguous span
    of keys per sequence."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2:] not in ((len_q, len_kv), (1, len_kv)):
        raise UnsupportedError(f"attnzoo patch: expected a (batch, 1, Nq, Nk) attention mask, got shape {tuple(mask.shape)}")
    mask = bool_mask(mask)[:, 0].expand(batch, len_q, len_kv)
    device, off = mask.device, len_kv - len_q
    pattern = causal_mask(len_q, len_kv, device) if causal else torch.ones(len_q, len_kv, dtype=torch.bool, device=device)
    keys = mask.any(dim=1)
    if bool(keys.all()) and bool((mask == pattern).all()):
        return None
    spans = []
    positions = torch.arange(len_kv, device=device)
    for b in range(batch):
        valid = keys[b].nonzero()
        if not len(valid):
            continue
        ks, ke = int(valid[0]), int(valid[-1]) + 1
        qs, qe = max(ks - off, 0), ke - off
        expected = pattern[qs:qe] & ((positions >= ks) & (positions < ke))
        if qe <= qs or not bool(keys[b, ks:ke].all()) or not torch.equal(mask[b, qs:qe], expected):
            raise UnsupportedError(NOT_PADDING)
        spans.append((b, slice(qs, qe), slice(ks, ke)))
    return spans


Run = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], torch.Tensor]


def masked_run(run: Run, q, k, v, mask, causal: bool, scale: float, *, per_key: bool = False) -> torch.Tensor:
    """``run(q, k, v, causal, scale)`` on the whole batch, or on each sequence's unpadded span
    when ``mask`` marks padding (see :func:`sequence_spans`); padded query rows get zeros.

    ``run`` returns (B, Hq, Nq, Dv) outputs, or with ``per_key`` (B, Hq, Nq, Nk) rows over the keys
    (attention probabilities), which land in the span's key columns."""
    spans = sequence_spans(mask, q.shape[0], q.shape[2], k.shape[2], causal)
    if spans is None:
        return run(q, k, v, causal, scale)
    out = q.new_zeros(*q.shape[:3], k.shape[2] if per_key else v.shape[-1], dtype=work_dtype(q) if per_key else q.dtype)
    for b, qs, ks in spans:
        result = run(q[b:b + 1, :, qs], k[b:b + 1, :, ks], v[b:b + 1, :, ks], causal, scale)
        if per_key:
            out[b:b + 1, :, qs, ks] = result
        else:
            out[b:b + 1, :, qs] = result
    return out
