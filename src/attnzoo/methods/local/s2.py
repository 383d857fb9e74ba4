"""S2-Attention: heterogeneous per-head strided shards of the context plus a local band."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import check_int
from ...kernels.block_sparse.builders import compact
from ...masks import causal_allowed
from ...method import Call, MethodInfo
from ...registry import register
from .base import PatternMethod


@register
class S2(PatternMethod):
    """Sparsely-sharded attention ("S2-Attention: Hardware-Aware Context Sharding Among Attention
    Heads", arXiv 2407.17678), with DKernel's local-stride pattern at ``block_size`` granularity:
    head h sees the ``local_blocks`` key blocks nearest its query block, plus every key block kb with
    (kb + h * step + 1) % vert_stride == 0, step = max(1, vert_stride // heads). Each head holds a
    different shard; together the heads cover the whole context. Nq != Nk aligns queries
    bottom-right. q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D)."""

    info = MethodInfo(
        name="s2", title="S2-Attention: Hardware-Aware Context Sharding Among Attention Heads", arxiv="2407.17678",
        family=("local",), causal=True, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(N (local + N / (stride b)) b D)", memory="O(H N (local + N / stride)) cached block lists",
        summary="per-head strided shards + local blocks (context sharding among heads)",
    )

    @dataclass
    class Config:
        block_size: int = 64
        local_blocks: int = 16
        vert_stride: int = 8

        def __post_init__(self):
            self.block_size = check_int("block_size", self.block_size)
            self.local_blocks = check_int("local_blocks", self.local_blocks)
            self.vert_stride = check_int("vert_stride", self.vert_stride)

    def _offsets(self, call: Call) -> torch.Tensor:
        stride = self.config.vert_stride
        step = max(1, stride // call.heads_q)
        return torch.arange(call.heads_q, device=call.device) * step

    def _visible(self, call: Call, h, q_abs, kv_idx):
        """Pattern on absolute query positions and key positions (broadcast), head offsets ``h``."""
        b, local, stride = self.config.block_size, self.config.local_blocks, self.config.vert_stride
        qb, kb = q_abs // b, kv_idx // b
        near = (qb - kb < local) if call.causal else ((qb - kb).abs() < local)
        return near | ((kb + h + 1) % stride == 0)

    def mask_mod(self, call: Call):
        offsets, off = self._offsets(call), call.len_kv - call.len_q

        def mask_mod(b, h, q_idx, kv_idx):
            allowed = self._visible(call, offsets[h], q_idx + off, kv_idx)
            return allowed & causal_allowed(call, q_idx, kv_idx) if call.causal else allowed

        return mask_mod

    def build_layout(self, call: Call):
        """Per head: the local key blocks of a query block's first and last position, then the
        strided ones (up to its last position when causal); block granularity on both axes."""
        b, local, stride = self.config.block_size, self.config.local_blocks, self.config.vert_stride
        dev = call.device
        nqb, nkb = -(-call.len_q // b), -(-call.len_kv // b)
        off = call.len_kv - call.len_q
        first = (torch.arange(nqb, device=dev) * b + off) // b
        last = ((torch.arange(nqb, device=dev) * b + b).clamp(max=call.len_q) - 1 + off) // b
        lo = first - local + 1
        hi = last if call.causal else last + local - 1
        span = local + int((last - first).max()) + (0 if call.causal else local - 1)
        near = lo[:, None] + torch.arange(span, device=dev)
        near = torch.where((near >= 0) & (near <= hi[:, None]) & (near < nkb), near, -1)
        # strided blocks kb = m * stride - 1 - offset, for every head
        offsets = self._offsets(call) % stride
        m = torch.arange(nkb // stride + 2, device=dev)
        strided = m[None, :] * stride - 1 - offsets[:, None]  # (H, M)
        limit = last if call.causal else torch.full_like(last, nkb - 1)
        strided = strided[:, None, :].expand(-1, nqb, -1)
        far = strided < lo[None, :, None]
        beyond = (strided > hi[None, :, None]) & (strided <= limit[None, :, None])
        strided = torch.where((strided >= 0) & (strided < nkb) & (far | beyond), strided, -1)
        keys = torch.cat([near[None].expand(call.heads_q, -1, -1), strided], dim=-1)
        return compact(keys, call.len_q, call.len_kv, b, kv_block=b)

    def reference_mask(self, call: Call) -> torch.Tensor:
        """The pattern written from the paper (loops over heads and key blocks, no code shared with
        the fast path): head h's shard is every key block kb with (kb + h * max(1, vert_stride //
        H) + 1) % vert_stride == 0, visible to all its queries; every other key block is visible to
        the queries whose block (absolute position // block_size) lies fewer than ``local_blocks``
        blocks after it (either side when not causal). (1, Hq, Nq, Nk) bool."""
        b, local, stride = self.config.block_size, self.config.local_blocks, self.config.vert_stride
        heads, nq, nk = call.heads_q, call.len_q, call.len_kv
        step = max(1, stride // heads)
        query_block = (torch.arange(nq, device=call.device) + nk - nq) // b
        mask = torch.zeros(1, heads, nq, nk, dtype=torch.bool, device=call.device)
        for h in range(heads):
            for kb in range(-(-nk // b)):
                keys = slice(kb * b, (kb + 1) * b)
                if (kb + h * step + 1) % stride == 0:
                    mask[0, h, :, keys] = True
                else:
                    after = query_block - kb
                    mask[0, h, :, keys] = ((after >= 0) & (after < local) if call.causal else after.abs() < local)[:, None]
        return mask
