"""SG-Former: a significance map from coarse attention reallocates key tokens, finer where salient."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import InvalidArgumentError, check_int
from ...kernels.dense import repeat_kv, sdpa, work_dtype
from ...method import Call, MethodInfo
from ...registry import register
from . import naive
from .base import DynamicMethod, RegionConfig
from .scoring import block_means, region_order


REALLOCATIONS = ("runs", "tiers")


@register
class SGFormer(DynamicMethod):
    """Significance-guided attention ("SG-Former: Self-guided Transformer with Evolving Token
    Reallocation", arXiv 2308.12216), training-free: the keys and values are reallocated into at
    most ``num_tokens`` new tokens, fine where the attention is significant and coarse elsewhere,
    and every query attends to them (dense SDPA over the new tokens, each the mean of its tokens).
    Computed per head. Non-causal self-attention; no sparse support (pooled keys).
    ``reallocation="tiers"`` is the paper's rule (OliverRensu/SG-Former): every token's
    significance is what its attention maps give it (the mass all queries put on its region's mean
    key, SG-Former's global attention over down-sampled keys, plus the mass its own region's queries
    put on it, its local window attention; regions: ``n_win`` per grid axis); the tokens are sorted
    by significance and the least significant quarter, the middle half and the top quarter are cut
    into 1 : 7 : 7 of the new tokens (equal runs of the sorted order), so salient tokens merge in
    small groups and minor ones in large groups, whether neighbours or not.
    ``reallocation="runs"`` (the default, not in the paper): a region's significance is the mass the
    region means put on its mean key, and walking the tokens in region-major order every new token
    averages a run carrying an equal share of significance, so each new token is a spatially
    contiguous run.
    q (B, Hq, N, D), k/v (B, Hkv, N, D|Dv). Cost O(R^2 D + N M D) ("runs"), O(N (R + N / R) D + N M D)
    ("tiers"), M = ``num_tokens``.

    What differs from the paper even with ``"tiers"``: the significance comes from the current
    call's q and k, per head, where the paper takes it from the previous hybrid-scale layer (so it
    evolves with training), its global maps from half of the heads and its local ones (7 x 7
    windows) from the other half; the paper merges each run with a learned linear map per tier (here
    the mean) and builds two key sequences (row- and column-major ties) for two halves of the heads
    (here one, row-major ties within the region-major order); its local-window heads (hybrid
    scale) are here the ``sliding_window`` or ``neighborhood`` methods."""

    info = MethodInfo(
        name="sgformer", title="SG-Former: Self-guided Transformer with Evolving Token Reallocation", arxiv="2308.12216",
        family=("dynamic",), causal=False, non_causal=True, cross=False, gqa=True, training_free=True,
        time="O(R^2 D + N M D)", memory="O(N + M D) per head", spatial=True,
        summary="significance map from coarse attention; salient regions keep more (finer) key tokens",
    )

    @dataclass
    class Config(RegionConfig):
        n_win: int = 8
        num_tokens: int = 64
        reallocation: str = "runs"

        def __post_init__(self):
            super().__post_init__()
            self.num_tokens = check_int("num_tokens", self.num_tokens)
            if self.reallocation not in REALLOCATIONS:
                raise InvalidArgumentError("reallocation", f"one of {REALLOCATIONS}", repr(self.reallocation))

    def check(self, call: Call) -> None:
        self.config.sides(call.len_q)

    def groups(self, q, k, call: Call) -> torch.Tensor:
        """(B, Hq, N) new-token id of every original token, by the ``reallocation`` rule."""
        grid = self.config.sides(call.len_q)
        order = region_order(grid, self.config.n_win, call.device)
        size = call.len_q // self.config.n_win ** len(grid)
        q_regions = q[:, :, order]  # region-major: region r is tokens [r size, (r + 1) size)
        k_regions = repeat_kv(k[:, :, order], call.groups)
        if self.config.reallocation == "tiers":
            ids_sorted = self._tiers(_token_significance(q_regions, k_regions, size, call.scale))
        else:
            ids_sorted = self._runs(q_regions, k_regions, size, call.scale)
        ids = torch.empty_like(ids_sorted)
        ids[..., order] = ids_sorted
        return ids

    def _runs(self, q_regions, k_regions, size: int, scale: float) -> torch.Tensor:
        """New-token ids (region-major): region means attend region means, a region's
        significance is the mass it receives, and runs of tokens carrying equal significance merge."""
        qr, kr = block_means(q_regions, size), block_means(k_regions, size)
        significance = torch.softmax(qr @ kr.transpose(-1, -2) * scale, dim=-1).mean(2)  # (B, Hq, R)
        weight = (significance / size).repeat_interleave(size, dim=-1).double()  # per token, region-major
        before = torch.cumsum(weight, dim=-1) - weight  # significance of the tokens before each token
        share = (before / weight.sum(-1, keepdim=True)).nan_to_num(0.0)  # NaN inputs (check_finite=False) pool to token 0
        return (share * self.config.num_tokens).floor().long().clamp(max=self.config.num_tokens - 1)

    def _tiers(self, significance: torch.Tensor) -> torch.Tensor:
        """New-token ids from per-token ``significance`` (B, Hq, N): tokens sorted by it, the least
        significant quarter, the middle half and the top quarter cut into 1 : 7 : 7 of the
        ``num_tokens`` new tokens (equal runs of the sorted order; SG-Former at reduction ratio 4
        and 8)."""
        n, m = significance.shape[-1], self.config.num_tokens
        sizes = [n // 4, n - 2 * (n // 4), n // 4]
        low = max(1, m // 15)
        counts = [low, (m - low) // 2, m - low - (m - low) // 2]
        counts = [min(c, s) for c, s in zip(counts, sizes)]
        rank_of = torch.empty_like(significance, dtype=torch.long)
        by_significance = torch.sort(significance.nan_to_num(0.0), dim=-1, stable=True).indices
        rank_of.scatter_(-1, by_significance, torch.arange(n, device=significance.device).expand_as(by_significance))
        ids = torch.zeros_like(rank_of)
        start, first_id = 0, 0
        for size, count in zip(sizes, counts):
            inside = (rank_of >= start) & (rank_of < start + size)
            ids = torch.where(inside, first_id + ((rank_of - start) * count) // max(size, 1), ids)
            start, first_id = start + size, first_id + count
        return ids

    def _pooled(self, x, ids, call: Call):
        """Mean of ``x`` (B, Hq, N, D) over each new token; (B, Hq, M, D) and the token counts (B, Hq, M)."""
        M, work = self.config.num_tokens, work_dtype(x)
        sums = torch.zeros(*x.shape[:2], M, x.shape[-1], dtype=work, device=x.device)
        sums.scatter_add_(2, ids[..., None].expand(-1, -1, -1, x.shape[-1]), x.to(work))
        counts = torch.zeros(*x.shape[:2], M, dtype=work, device=x.device).scatter_add_(2, ids, torch.ones_like(ids, dtype=work))
        return sums / counts.clamp(min=1)[..., None], counts

    def plan(self, q, k, call: Call) -> torch.Tensor:
        return self.groups(q, k, call)

    def execute(self, q, k, v, call: Call, ids) -> tuple[torch.Tensor, dict]:
        """Exact attention of every query over the pooled keys and values of the new tokens."""
        kp, counts = self._pooled(repeat_kv(k, call.groups), ids, call)
        vp, _ = self._pooled(repeat_kv(v, call.groups), ids, call)
        used = counts > 0
        work = q.float() if q.dtype in (torch.float16, torch.bfloat16) else q
        out = sdpa(work, kp.to(work.dtype), vp.to(work.dtype), causal=False, scale=call.scale,
                   mask=None if bool(used.all()) else used[:, :, None, :]).to(q.dtype)
        pooled_entries = int(used.sum()) * call.len_q  # each query against each non-empty pooled token
        return out, {"allowed": pooled_entries, "computed": pooled_entries, "backend": "torch", "executor": "sdpa",
                     "tokens": int(used.sum(-1).max())}

    def _support(self, q, k, v, call: Call) -> None:
        return None  # pooled keys: no (query, key) support

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        cfg = self.config
        return naive.sgformer_reference(q, k, v, n_win=cfg.n_win, num_tokens=cfg.num_tokens, grid=cfg.grid, scale=call.scale,
                                        reallocation=cfg.reallocation)


def _token_significance(q_regions, k_regions, size: int, scale: float) -> torch.Tensor:
    """(B, H, N) significance of every token (region-major), as SG-Former's two attention maps give
    it: the mass all queries put on its region's mean key (global, down-sampled keys, spread to the
    region's tokens) plus the mass its region's queries put on it (local attention within the
    region, the window)."""
    kr = block_means(k_regions, size)  # (B, H, R, D)
    global_mass = torch.softmax(q_regions.to(kr.dtype) @ kr.transpose(-1, -2) * scale, dim=-1).mean(2)  # (B, H, R)
    qw = q_regions.unflatten(2, (-1, size)).to(kr.dtype)  # (B, H, R, s, D)
    kw = k_regions.unflatten(2, (-1, size)).to(kr.dtype)
    local_mass = torch.softmax(qw @ kw.transpose(-1, -2) * scale, dim=-1).mean(3)  # (B, H, R, s)
    return global_mass.repeat_interleave(size, dim=-1) + local_mass.flatten(2)
