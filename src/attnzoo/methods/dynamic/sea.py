"""SEA: estimate attention with a linear attention, keep the top-k keys, attend there exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import check_int
from ...kernels.block_sparse import (
    CausalMask,
    membership,
)
from ...kernels.block_sparse.builders import compact
from ...kernels.dense import causal_mask, repeat_kv
from ...kernels.linear.feature_maps import favor_features, orthogonal_gaussian
from ...method import Call, MethodInfo
from ...registry import register
from . import naive
from .base import DynamicMethod, Selection


@dataclass
class SEAConfig:
    """``top_k``: keys kept per query block (beyond the block's own diagonal keys, always kept so
    every query sees a key); ``q_block``: queries sharing a selection; ``num_features``/``seed``:
    the Performer estimate."""

    top_k: int = 128
    q_block: int = 64
    num_features: int = 64
    seed: int = 0

    def __post_init__(self):
        self.top_k = check_int("top_k", self.top_k)
        self.q_block = check_int("q_block", self.q_block)
        self.num_features = check_int("num_features", self.num_features)
        self.seed = check_int("seed", self.seed, minimum=0)


@register
class SEA(DynamicMethod):
    """SEA ("SEA: Sparse Linear Attention with Estimated Attention Mask", arXiv 2310.01777):
    estimate the attention matrix with a linear attention (Performer features), keep the ``top_k``
    keys of every query block, and compute exact softmax attention on those keys with the shared
    block-sparse executor. Each query's
    estimated row is Performer's attention: phi(q_i) . phi(k_j) normalised over the keys q_i sees
    (so the features' stabilisers cancel); a query block scores a key by the mean of its queries'
    rows. Training-free: the paper's learned decoder that refines the estimate (a compressed
    estimate, its mask interpolated back to N columns) is not included, and the paper selects per
    query row where this selects per ``q_block`` queries. Estimation costs
    O(N^2 M / q_block), attention O(N (k + q_block) D). q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv)."""

    info = MethodInfo(
        name="sea", title="SEA: Sparse Linear Attention with Estimated Attention Mask", arxiv="2310.01777",
        family=("linear", "dynamic"), causal=True, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(N^2 M / b + N k D)", memory="O(N^2 / b + N k)",
        summary="Performer estimate of attention -> top-k keys per query block -> exact sparse attention",
    )
    Config = SEAConfig

    def __init__(self, **config):
        super().__init__(**config)
        self._projections: dict = {}

    def projection(self, call: Call) -> torch.Tensor:
        """(1, num_features, D) the Performer projection of this head dimension, drawn once from ``seed``."""
        if call.dim not in self._projections:
            self._projections[call.dim] = orthogonal_gaussian(self.config.num_features, call.dim, seed=self.config.seed)
        return self._projections[call.dim]

    def select(self, q, k, call: Call) -> torch.Tensor:
        """(B, Hq, nQB, q_block + top_k) key ids per query block, -1 for none: the block's diagonal
        keys, then the top_k keys of the estimate among the other allowed keys."""
        cfg, dev = self.config, q.device
        proj, root = self.projection(call), call.scale ** 0.5
        qf = favor_features(q * root, proj, is_query=True)
        kf = repeat_kv(favor_features(k * root, proj, is_query=False), call.groups)
        nqb, b, off = -(-call.len_q // cfg.q_block), cfg.q_block, call.len_kv - call.len_q
        qf = qf * _row_normaliser(qf, kf, call)[..., None]
        pad = nqb * b - call.len_q
        block_mean = torch.nn.functional.pad(qf, (0, 0, 0, pad)).unflatten(2, (nqb, b)).sum(3)
        block_mean = block_mean / torch.clamp(call.len_q - torch.arange(nqb, device=dev) * b, max=b)[:, None]
        estimate = block_mean @ kf.transpose(-1, -2)  # (B, Hq, nQB, Nk)
        first = torch.arange(nqb, device=dev) * b + off  # position of each block's first query
        diag = first[:, None] + torch.arange(b, device=dev)[None, :]
        diag_ok = (diag >= 0) & (diag < call.len_kv) & (diag - off < call.len_q)
        keys_pos = torch.arange(call.len_kv, device=dev)[None, :]
        last = torch.clamp(first + b, max=call.len_q + off) - 1
        excluded = (keys_pos >= first[:, None]) & (keys_pos <= last[:, None])
        if call.causal:
            excluded = excluded | (keys_pos > last[:, None])
        estimate = estimate.masked_fill(excluded, float("-inf"))
        top = estimate.topk(min(cfg.top_k, call.len_kv), dim=-1)
        chosen = torch.where(torch.isfinite(top.values), top.indices, -1)
        diag_keys = torch.where(diag_ok, diag, -1).expand(*chosen.shape[:2], -1, -1)
        return torch.cat([diag_keys, chosen], dim=-1)

    def plan(self, q, k, call: Call) -> Selection:
        keys = self.select(q, k, call)
        mask_mod = CausalMask(call.len_kv - call.len_q) if call.causal else None
        return Selection(compact(keys, call.len_q, call.len_kv, self.config.q_block, mask_mod=mask_mod, covers_mask=False))

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        support = naive.sea_support(q, k, top_k=self.config.top_k, q_block=self.config.q_block, proj=self.projection(call)[0],
                                    causal=call.causal, scale=call.scale)
        return naive.support_reference(q, k, v, support, call.scale)

    def _support(self, q, k, v, call: Call):
        keys = self.select(q, k, call)
        mask = membership(keys, call.len_kv).repeat_interleave(self.config.q_block, dim=2)[:, :, : call.len_q]
        return mask & causal_mask(call.len_q, call.len_kv, q.device) if call.causal else mask


def _row_normaliser(qf: torch.Tensor, kf: torch.Tensor, call: Call) -> torch.Tensor:
    """(B, Hq, Nq): 1 / sum_j phi(q_i) . phi(k_j) over the keys query i sees (all, or the first
    i + Nk - Nq + 1 when causal); 0 for a query that sees none."""
    if not call.causal:
        total = qf @ kf.sum(2)[..., None]
        return 1.0 / total[..., 0].clamp(min=torch.finfo(qf.dtype).tiny)
    reach = torch.arange(call.len_q, device=qf.device) + (call.len_kv - call.len_q)
    prefix = kf.cumsum(2).index_select(2, reach.clamp(min=0))  # (B, Hq, Nq, M): keys up to each reach
    total = (qf * prefix).sum(-1).clamp(min=torch.finfo(qf.dtype).tiny)
    return torch.where(reach >= 0, 1.0 / total, 0.0)
