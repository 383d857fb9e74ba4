"""SG-Former: a significance map from coarse attention reallocates key tokens, finer where salient."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import check_int
from ...kernels.dense import masked_attention, repeat_kv, sdpa, work_dtype
from ...method import Call, MethodInfo
from ...registry import register
from .base import DynamicMethod, RegionConfig
from .scoring import block_means, region_order


@register
class SGFormer(DynamicMethod):
    """Significance-guided attention ("SG-Former: Self-guided Transformer with Evolving Token
    Reallocation", arXiv 2308.12216), training-free. A coarse attention between region means
    (``n_win`` regions per grid axis) gives each region's significance, the attention mass it
    receives. The keys and values are then reallocated into ``num_tokens`` new tokens: walking the
    tokens in region-major order, every new token averages a run of tokens carrying an equal share
    of significance, so salient regions keep many fine tokens and background regions merge into
    few coarse ones. Every query attends to the reallocated tokens (dense SDPA over ``num_tokens``
    keys). Computed per head. Non-causal self-attention; no sparse support (pooled keys).
    q (B, Hq, N, D), k/v (B, Hkv, N, D|Dv). Cost O(R^2 D + N M D), M = ``num_tokens``.

    What differs from the paper and its code (OliverRensu/SG-Former): (1) significance: the paper
    scores every token by the previous hybrid-scale layer's attention maps (the mean over heads
    and queries of the global attention onto the down-sampled keys, interpolated to tokens, plus
    the mean of the 7 x 7 window attention onto each token), so it evolves with training; here it
    comes from the current call's q and k, per region (region means attending region means), the
    same for every token of a region. (2) reallocation: the paper sorts the tokens by significance
    and merges runs of the sorted order in three tiers (the least significant quarter in groups of
    49, the middle half in groups of 14, the top quarter in groups of 7 at reduction ratio 4:
    new tokens in proportion 1 : 7 : 7), so merged tokens need not be neighbours; here runs of
    the region-major order carry equal significance, so a new token is a spatially contiguous run.
    (3) merging: the paper merges with a learned linear map per tier, here the mean. (4) the paper
    computes two key sequences (row- and column-major ties) for two halves of the heads, and its
    local-window heads (hybrid scale) are here the ``sliding_window`` or ``neighborhood`` methods."""

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

        def __post_init__(self):
            super().__post_init__()
            self.num_tokens = check_int("num_tokens", self.num_tokens)

    def check(self, call: Call) -> None:
        self.config.sides(call.len_q)

    def groups(self, q, k, call: Call) -> torch.Tensor:
        """(B, Hq, N) new-token id of every original token (ids increase along the region-major order)."""
        grid = self.config.sides(call.len_q)
        order = region_order(grid, self.config.n_win, call.device)
        size = call.len_q // self.config.n_win ** len(grid)
        qr = block_means(q[:, :, order], size)
        kr = repeat_kv(block_means(k[:, :, order], size), call.groups)
        significance = torch.softmax(qr @ kr.transpose(-1, -2) * call.scale, dim=-1).mean(2)  # (B, Hq, R)
        weight = (significance / size).repeat_interleave(size, dim=-1).double()  # per token, region-major
        before = torch.cumsum(weight, dim=-1) - weight  # significance of the tokens before each token
        share = (before / weight.sum(-1, keepdim=True)).nan_to_num(0.0)  # NaN inputs (check_finite=False) pool to token 0
        ids_sorted = (share * self.config.num_tokens).floor().long()
        ids = torch.empty_like(ids_sorted)
        ids[..., order] = ids_sorted.clamp(max=self.config.num_tokens - 1)
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
        ids = self.groups(q, k, call)
        member = torch.nn.functional.one_hot(ids, self.config.num_tokens).transpose(-1, -2).double()  # (B, Hq, M, N)
        counts = member.sum(-1)
        pool = member / counts.clamp(min=1)[..., None]
        kp = pool @ repeat_kv(k, call.groups).double()
        vp = pool @ repeat_kv(v, call.groups).double()
        return masked_attention(q.double(), kp, vp, (counts > 0)[:, :, None, :], scale=call.scale).to(q.dtype)
