"""Scores and block bookkeeping shared by the content-selected (dynamic) methods: pooled block
logits, exact attention mass of sampled queries, causal block bounds, top-k with holes."""

from __future__ import annotations

import torch

from ...kernels.dense import repeat_kv, work_dtype
from ...method import Call


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, ceil(N / block), D) float32 (float64 stays): the mean of each block,
    a ragged last block over its own tokens. Reads x in place (no padded copy)."""
    n = x.shape[2]
    full = n // block
    work = work_dtype(x)
    means = x[:, :, : full * block].unflatten(2, (full, block)).mean(3, dtype=work)
    if n % block:
        means = torch.cat([means, x[:, :, full * block :].mean(2, keepdim=True, dtype=work)], dim=2)
    return means


def last_key_block(call: Call, q_block: int, kv_block: int) -> torch.Tensor:
    """(nQB,) the last key block a query block may see: its diagonal block when causal (queries
    aligned bottom-right), the last key block otherwise."""
    nqb = -(-call.len_q // q_block)
    if not call.causal:
        return torch.full((nqb,), -(-call.len_kv // kv_block) - 1, device=call.device)
    last_q = (torch.arange(1, nqb + 1, device=call.device) * q_block).clamp(max=call.len_q) - 1
    return (last_q + call.len_kv - call.len_q).clamp(min=-1) // kv_block


def region_order(grid: tuple[int, ...], n_win: int, device) -> torch.Tensor:
    """(N,) original token index at each position of the region-major order of a row-major ``grid``
    cut into ``n_win`` regions per axis (1-D grids: the natural order)."""
    idx = torch.arange(torch.Size(grid).numel(), device=device).view(grid)
    if len(grid) == 1:
        return idx
    h, w = grid
    return idx.view(n_win, h // n_win, n_win, w // n_win).permute(0, 2, 1, 3).flatten()


def forced_blocks(call: Call, q_block: int, kv_block: int, local_blocks: int) -> torch.Tensor:
    """(nQB, F) key blocks every query block visits whatever the scores say, most important first,
    -1 where none: when causal the diagonal block, then the first block (attention sinks), then the
    ``local_blocks`` blocks before the diagonal; only the first block otherwise. (MInference
    likewise always keeps the first columns and the nearest diagonals.)"""
    diag = last_key_block(call, q_block, kv_block)
    if not call.causal:
        return torch.zeros(diag.numel(), 1, dtype=torch.long, device=call.device)
    local = diag[:, None] - torch.arange(1, local_blocks + 1, device=call.device)
    ids = torch.cat([diag[:, None], torch.zeros_like(diag)[:, None], local], 1)
    return torch.where((ids >= 0) & (ids <= diag[:, None]), ids, -1)


def top_blocks(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the ``k`` best key blocks per row of ``scores`` (..., nKB), -1 where the score is -inf."""
    k = min(k, scores.shape[-1])
    top = scores.topk(k, dim=-1)
    return torch.where(torch.isfinite(top.values), top.indices, -1)


def allowed_blocks(call: Call, q_block: int, kv_block: int) -> torch.Tensor:
    """(nQB, nKB) bool: key blocks a query block may visit (the causal block triangle, or all)."""
    nkb = -(-call.len_kv // kv_block)
    last = last_key_block(call, q_block, kv_block)
    return torch.arange(nkb, device=call.device)[None, :] <= last[:, None]


def unique_blocks(keys: torch.Tensor) -> torch.Tensor:
    """Key block lists (..., K) with -1 holes and repeats -> each block once (sorted), -1 holes;
    O(K log K) per list, independent of the number of key blocks."""
    big = torch.iinfo(keys.dtype).max
    ordered = torch.sort(torch.where(keys >= 0, keys, big), dim=-1).values
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    return torch.where(repeat | (ordered == big), -1, ordered)


_SCORE_ENTRIES = 1 << 23  # query x key logits formed at once by sampled_query_mass (32 MB)


_GATHERED_KEYS = 1 << 19  # key elements listed_block_mass gathers at once (2 MB, in cache)


def sample_rows(call: Call, q_block: int, samples: int) -> torch.Tensor:
    """(nQB, min(samples, q_block)) query positions per query block, evenly spaced and ending at its
    last query; a short last block repeats its queries equally often."""
    r = min(samples, q_block)
    first = torch.arange(-(-call.len_q // q_block), device=call.device) * q_block
    last = (first + q_block).clamp(max=call.len_q) - 1
    return last[:, None] - (torch.arange(r, device=call.device) * (last - first + 1)[:, None]) // r


def sampled_query_mass(q, k, call: Call, q_block: int, kv_block: int, samples: int) -> torch.Tensor:
    """(B, Hq, nQB, nKB) float32: for each query block, the exact causal softmax of ``samples`` of
    its queries (evenly spaced, the last one included; a short last block repeats its queries
    equally often) over every key they may see, summed per key block and over the samples; -inf on
    blocks the query block may not visit. Costs ``samples / q_block`` of the dense logits (half of
    that when causal), a chunk of query blocks at a time; GQA without copying keys (each key head's
    query heads are stacked as rows)."""
    B, Hq, G = call.batch, call.heads_q, call.groups
    nqb, nkb = -(-call.len_q // q_block), -(-call.len_kv // kv_block)
    rows = sample_rows(call, q_block, samples)
    r = rows.shape[1]
    visible_to = rows + (call.len_kv - call.len_q) if call.causal else torch.full_like(rows, call.len_kv - 1)
    keys = k.to(work_dtype(k))
    step = max(1, _SCORE_ENTRIES // max(1, B * Hq * r * call.len_kv))
    mass = torch.zeros(B, Hq, nqb, nkb, dtype=keys.dtype, device=q.device)
    for a in range(0, nqb, step):
        c = min(step, nqb - a)
        sees = visible_to[a : a + c].flatten()
        seen = min(int(sees.max()) + 1, call.len_kv)  # keys beyond every row of the chunk are skipped
        if seen <= 0:
            continue
        picked = q[:, :, rows[a : a + c].flatten()].to(keys.dtype).reshape(B, Hq // G, G * c * r, -1)
        logits = (picked @ keys[:, :, :seen].transpose(-1, -2)).mul_(call.scale).view(B, Hq, c * r, seen)
        logits.masked_fill_(torch.arange(seen, device=q.device)[None, :] > sees[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).view(B, Hq, c, r, seen)
        if bool((sees < 0).any()):  # rows that see no key (causal cross attention, Nk < Nq)
            probs = probs.nan_to_num(0.0)
        full = seen // kv_block
        mass[:, :, a : a + c, :full] = probs[..., : full * kv_block].unflatten(-1, (full, kv_block)).sum((3, 5))
        if seen % kv_block:
            mass[:, :, a : a + c, full] = probs[..., full * kv_block :].sum((3, 4))
    return mass.masked_fill_(~allowed_blocks(call, q_block, kv_block), float("-inf"))


def listed_block_mass(q, k, call: Call, blocks: torch.Tensor, q_block: int, kv_block: int, samples: int) -> torch.Tensor:
    """(B, Hq, nQB, K) float32: for each query block, the causal softmax of ``samples`` of its
    queries (as :func:`sampled_query_mass`) over the keys of its listed key ``blocks`` (B, Hq, nQB, K;
    -1 holes, no repeats) only, summed per listed block and over the samples; 0 on holes.
    O(samples K kv_block D) per query block, however long the sequence: a cheap exact re-ranking of
    a few candidates. One query head at a time (its key head's keys stay in cache) and a chunk of
    query blocks whose gathered keys fit in a few MB."""
    B, Hq, G = call.batch, call.heads_q, call.groups
    D, K = k.shape[-1], blocks.shape[-1]
    nkb = -(-call.len_kv // kv_block)
    rows = sample_rows(call, q_block, samples)
    visible_to = rows + (call.len_kv - call.len_q) if call.causal else torch.full_like(rows, call.len_kv - 1)
    work = work_dtype(k)
    keys = torch.nn.functional.pad(k.to(work), (0, 0, 0, nkb * kv_block - call.len_kv)).unflatten(2, (nkb, kv_block))
    offsets = torch.arange(kv_block, device=q.device)
    step = max(1, _GATHERED_KEYS // (K * kv_block * D))
    mass = torch.zeros(B, Hq, rows.shape[0], K, dtype=work, device=q.device)
    for b in range(B):
        for h in range(Hq):
            head_keys, head_q = keys[b, h // G], q[b, h, rows].to(work)  # (nKB, b, D), (nQB, r, D)
            for a in range(0, rows.shape[0], step):
                ids = blocks[b, h, a : a + step]
                picked = head_keys.index_select(0, ids.clamp(min=0).flatten()).view(ids.shape[0], K * kv_block, D)
                logits = (picked @ head_q[a : a + step].transpose(-1, -2)).mul_(call.scale)  # (c, K b, r)
                pos = (ids[..., None] * kv_block + offsets).flatten(-2)  # (c, K b)
                hidden = (ids < 0).repeat_interleave(kv_block, -1) | (pos >= call.len_kv)
                unseen = hidden[..., None] | (pos[..., None] > visible_to[a : a + step, None, :])
                probs = torch.softmax(logits.masked_fill_(unseen, float("-inf")), dim=1).nan_to_num_(0.0)
                mass[b, h, a : a + step] = probs.unflatten(1, (K, kv_block)).sum((2, 3))
    return mass


def pooled_scores(q, k, call: Call, q_block: int, kv_block: int) -> torch.Tensor:
    """(B, Hq, nQB, nKB) block-to-block logits of mean-pooled queries and keys (GQA expanded),
    -inf on blocks a query block may not visit."""
    qp = block_means(q, q_block)
    kp = repeat_kv(block_means(k, kv_block), call.groups)
    scores = qp @ kp.transpose(-1, -2) * call.scale
    return scores.masked_fill(~allowed_blocks(call, q_block, kv_block), float("-inf"))
