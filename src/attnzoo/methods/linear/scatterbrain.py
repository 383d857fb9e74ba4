"""Scatterbrain: exact entries on LSH buckets plus a random-feature low-rank estimate elsewhere."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import InvalidArgumentError, check_int
from ...kernels.dense import repeat_kv
from ...kernels.linear import state_product, work_dtype
from ...kernels.linear.feature_maps import favor_exponent, orthogonal_gaussian
from ...kernels.linear.naive import safe_denominator
from ...method import Call, MethodInfo
from ...registry import register
from . import naive
from .base import LinearConfig, LinearMethod


@dataclass
class ScatterbrainConfig(LinearConfig):
    """``num_features``: Performer features of the low-rank part; ``num_buckets``: angular-LSH
    buckets (even, or 1: one bucket); ``bucket_chunk``: tokens per chunk after sorting by bucket (the sparse part
    pairs a query and a key when they share a bucket and a sorted chunk); ``seed``: both draws."""

    eps: float = 0.0
    num_features: int = 64
    num_buckets: int = 8
    bucket_chunk: int = 64
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.num_features = check_int("num_features", self.num_features)
        self.num_buckets = check_int("num_buckets", self.num_buckets)
        if self.num_buckets > 1 and self.num_buckets % 2:
            raise InvalidArgumentError("num_buckets", "1 or an even number (angular LSH: argmax over [xR, -xR])", self.num_buckets)
        self.bucket_chunk = check_int("bucket_chunk", self.bucket_chunk)
        self.seed = check_int("seed", self.seed, minimum=0)


@register
class Scatterbrain(LinearMethod):
    """Scatterbrain ("Scatterbrain: Unifying Sparse and Low-rank Attention Approximation", arXiv
    2110.15343): ``A ~ phi(Q) phi(K)^T + S`` with Performer features phi and a sparse correction
    ``S_ij = exp(q_i k_j * scale) - phi(q_i) phi(k_j)`` on the LSH set (Reformer-style: angular
    hash, tokens sorted by bucket and cut into chunks; a pair is in the set when it shares bucket and
    chunk), so every entry is counted once: exactly on the set, by the low-rank estimate elsewhere.
    Rows are normalised by ``A 1``. One bucket and a chunk >= N is exact attention. Self-attention. q (B, Hq, N, D), k/v (B, Hkv, N, D|Dv)."""

    info = MethodInfo(
        name="scatterbrain", title="Scatterbrain: Unifying Sparse and Low-rank Attention Approximation",
        arxiv="2110.15343", family=("linear",), causal=True, non_causal=True, cross=False, gqa=True,
        training_free=True, time="O(N M (D + Dv) + N c D)", memory="O(N (M + Dv + c))",
        summary="LSH-sparse exact entries + Performer low-rank estimate, no entry counted twice",
    )
    Config = ScatterbrainConfig

    def __init__(self, **config):
        super().__init__(**config)
        self._draws: dict = {}

    def draws(self, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, M, D) Performer projection and (D, buckets / 2) LSH rotation, drawn once per dim."""
        if dim not in self._draws:
            gen = torch.Generator().manual_seed(self.config.seed + 1)
            rotation = torch.randn(dim, self.config.num_buckets // 2, generator=gen)
            self._draws[dim] = orthogonal_gaussian(self.config.num_features, dim, seed=self.config.seed), rotation
        return self._draws[dim]

    def parts(self, q, k, call: Call):
        """Features and their stabilisers (phi = exp(e - c) / sqrt(M)), and of queries and of keys
        (expanded to the query heads) each token's LSH bucket and the order sorting by (bucket, position)."""
        proj, rotation = self.draws(call.dim)
        root = call.scale ** 0.5
        k = repeat_kv(k, call.groups)
        (eq, cq), (ek, ck) = favor_exponent(q * root, proj, is_query=True), favor_exponent(k * root, proj, is_query=False)
        norm = math.sqrt(proj.shape[-2])
        qf, kf = torch.exp(eq - cq) / norm, torch.exp(ek - ck) / norm
        ids = []
        for x in (q, k):
            if rotation.shape[1]:
                proj_x = x.to(rotation.dtype) @ rotation.to(x.device)
                bucket = torch.cat([proj_x, -proj_x], dim=-1).argmax(-1)  # (B, Hq, N)
            else:  # one bucket
                bucket = torch.zeros(x.shape[:3], dtype=torch.long, device=x.device)
            ids.append((bucket, torch.argsort(bucket * call.len_q + torch.arange(call.len_q, device=x.device), dim=-1)))
        return qf, kf, cq, ck, ids

    def _correction(self, q, k, v, call: Call):
        """Sparse part on sorted chunks: per query, ``sum_j S_ij v_j`` and ``sum_j S_ij`` (original order)."""
        qf, kf, cq, ck, ((bq, oq), (bk, ok)) = self.parts(q, k, call)
        work, c = work_dtype(q), self.config.bucket_chunk
        pad = (-call.len_q) % c
        k, v = repeat_kv(k, call.groups).to(work), repeat_kv(v, call.groups).to(work)
        pos = torch.arange(call.len_q, device=q.device).expand_as(oq)

        def sort_chunk(x, order, fill=0):
            x = torch.gather(x, 2, order[..., None].expand(*order.shape, x.shape[-1])) if x.dim() == 4 else torch.gather(x, 2, order)
            x = F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad), value=fill)
            return x.unflatten(2, (-1, c))

        qs, qfs, cqs = sort_chunk(q.to(work), oq), sort_chunk(qf, oq), sort_chunk(cq, oq)
        ks, kfs, vs = sort_chunk(k, ok), sort_chunk(kf, ok), sort_chunk(v, ok)
        same = sort_chunk(bq, oq, -1)[..., :, None] == sort_chunk(bk, ok, -2)[..., None, :]
        if call.causal:
            same = same & (sort_chunk(pos, ok, call.len_q)[..., None, :] <= sort_chunk(pos, oq, -1)[..., :, None])
        exact = torch.exp((qs @ ks.transpose(-1, -2)) * call.scale - cqs - ck[..., None])
        corr = torch.where(same, exact - qfs @ kfs.transpose(-1, -2), 0.0)
        num_den = torch.cat([corr @ vs, corr.sum(-1, keepdim=True)], dim=-1).flatten(2, 3)[:, :, : call.len_q]
        return torch.empty_like(num_den).scatter_(2, oq[..., None].expand_as(num_den), num_den)

    def _forward(self, q, k, v, call: Call):
        qf, kf, *_ = self.parts(q, k, call)
        v_aug = torch.cat([repeat_kv(v, call.groups), torch.ones_like(v[:, :1, :, :1]).expand(*qf.shape[:3], 1)], dim=-1)
        low_rank = state_product(qf, kf, v_aug, causal=call.causal, chunk=self.config.chunk, backend=self.backend)
        total = low_rank + self._correction(q, k, v, call)
        return (total[..., :-1] / safe_denominator(total[..., -1:], self.config.eps)).to(q.dtype)

    def _reference(self, q, k, v, call: Call):
        proj, rotation = self.draws(call.dim)
        return naive.scatterbrain_reference(q, k, v, proj=proj[0], rotation=rotation, bucket_chunk=self.config.bucket_chunk,
                                            scale=call.scale, causal=call.causal, eps=self.config.eps)
