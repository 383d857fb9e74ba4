"""Routing Transformer: k-means routing of queries and keys, attention within clusters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnzoo.methods.dynamic.base import DynamicMethod, Selection

from ...errors import check_int
from ...kernels.block_sparse.builders import compact
from ...kernels.dense import causal_mask, repeat_kv
from ...method import Call, MethodInfo
from ...registry import register


@register
class Routing(DynamicMethod):
    """Routing attention ("Efficient Content-Based Sparse Attention with Routing Transformers",
    arXiv 2003.05997): queries and keys, unit-normalised, are routed to the nearest of
    ``num_clusters`` shared centroids, and each query attends exactly to the keys of its own cluster
    (and only to earlier ones when causal; a query whose cluster holds no visible key gets zeros,
    as in the paper, where routing heads sit beside local heads). Training-free: the centroids are
    fitted per call and head by ``iterations`` steps of spherical k-means over the queries and keys,
    started from ``seed``-chosen tokens (the paper's online k-means updates them during training).
    Execution: per head, queries and keys are sorted by cluster, so a cluster is a contiguous range
    and each sorted query block visits the key blocks of its clusters on the block executor.
    q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv). Cost O(N C D) routing + O(N^2 D / C) attention for
    balanced clusters."""

    info = MethodInfo(
        name="routing", title="Efficient Content-Based Sparse Attention with Routing Transformers", arxiv="2003.05997",
        family=("dynamic",), causal=True, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(N C D + N^2 D / C)", memory="O(N (D + C)) plus the gathered key blocks",
        summary="k-means routing of queries and keys; attention within each cluster",
    )

    @dataclass
    class Config:
        num_clusters: int = 4
        iterations: int = 3
        seed: int = 0
        block_size: int = 32

        def __post_init__(self):
            self.num_clusters = check_int("num_clusters", self.num_clusters)
            self.iterations = check_int("iterations", self.iterations, minimum=0)
            self.seed = check_int("seed", self.seed, minimum=0)
            self.block_size = check_int("block_size", self.block_size, minimum=2)

    def clusters(self, q, k, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        """Cluster ids of the queries (B, Hq, Nq) and keys (B, Hq, Nk)."""
        qn = F.normalize(q.float(), dim=-1)
        kn = F.normalize(repeat_kv(k, call.groups).float(), dim=-1)
        tokens = torch.cat([qn, kn], dim=2)
        gen = torch.Generator().manual_seed(self.config.seed)
        count = min(self.config.num_clusters, tokens.shape[2])
        start = torch.randperm(tokens.shape[2], generator=gen)[:count].to(q.device)
        centroids = tokens[:, :, start]
        for _ in range(self.config.iterations):
            assign = (tokens @ centroids.transpose(-1, -2)).argmax(-1)
            sums = torch.zeros_like(centroids).scatter_add_(2, assign[..., None].expand_as(tokens), tokens)
            centroids = torch.where(sums.norm(dim=-1, keepdim=True) > 0, F.normalize(sums, dim=-1), centroids)
        return (qn @ centroids.transpose(-1, -2)).argmax(-1), (kn @ centroids.transpose(-1, -2)).argmax(-1)

    def plan(self, q, k, call: Call) -> Selection:
        """The layout in cluster-sorted order, with the sorted positions' original query and key indices."""
        b = self.config.block_size
        cq, ck = self.clusters(q, k, call)
        cq_s, q_pos = torch.sort(cq, dim=-1, stable=True)
        ck_s, k_pos = torch.sort(ck, dim=-1, stable=True)
        nqb = -(-call.len_q // b)
        first = cq_s[..., :: b]  # cluster of each sorted query block's first and last query
        last = cq_s[..., (torch.arange(nqb, device=q.device) * b + b).clamp(max=call.len_q) - 1]
        lo = torch.searchsorted(ck_s.contiguous(), first.contiguous(), side="left") // b
        hi = (torch.searchsorted(ck_s.contiguous(), last.contiguous(), side="right") - 1) // b
        width = max(int((hi - lo).max()) + 1, 1)
        keys = lo[..., None] + torch.arange(width, device=q.device)
        keys = torch.where(keys <= hi[..., None], keys, -1)
        off = call.len_kv - call.len_q

        def mask_mod(bi, hi_, q_idx, kv_idx):
            same = cq_s[bi, hi_][q_idx] == ck_s[bi, hi_][kv_idx]
            return same & (k_pos[bi, hi_][kv_idx] <= q_pos[bi, hi_][q_idx] + off) if call.causal else same

        layout = compact(keys, call.len_q, call.len_kv, b, kv_block=b, mask_mod=mask_mod)
        return Selection(layout, q_pos, k_pos)

    def _support(self, q, k, v, call: Call) -> torch.Tensor:
        cq, ck = self.clusters(q, k, call)
        same = cq[..., :, None] == ck[..., None, :]
        return same & causal_mask(call.len_q, call.len_kv, q.device) if call.causal else same
