"""HyperAttention: sortLSH for the large entries, uniform column sampling for the rest, causal recursion."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ...errors import check_int
from ...kernels.dense import causal_mask, repeat_kv, work_dtype
from ...method import Call, MethodInfo
from ...registry import register
from . import naive
from .base import DynamicMethod


def _gray_rank(code: torch.Tensor, bits: int) -> torch.Tensor:
    """Position of a Gray code in the Gray sequence: neighbouring ranks differ in one hyperplane."""
    rank = code.clone()
    shift = 1
    while shift < bits:
        rank ^= rank >> shift
        shift *= 2
    return rank


@dataclass
class _Piece:
    """One sub-problem: queries [q0, q0 + rows) against keys [k0, k0 + cols), computed ``kind``:
    "causal" (exact, lower triangle), "exact" (all entries) or "lsh" (sortLSH blocks + samples)."""

    kind: str
    q0: int
    k0: int
    rows: int
    cols: int
    q_sorted: torch.Tensor | None = None  # (B, H, rows) query offsets in LSH order
    k_sorted: torch.Tensor | None = None  # (B, H, cols) key offsets in LSH order
    samples: torch.Tensor | None = None  # (m,) sampled key offsets


@register
class HyperAttention(DynamicMethod):
    """HyperAttention ("HyperAttention: Long-context Attention in Near-Linear Time", arXiv
    2310.05868). Non-causal: queries and keys are hashed by ``num_projections`` random hyperplanes
    (angular LSH), sorted by the Gray-code rank of their hash (sortLSH) and split into blocks of
    ``block_size``; each sorted query block attends exactly to the key block at the same sorted
    position (the large entries), plus ``sample_size`` uniformly sampled keys weighted by
    n / sample_size (the rest of the row, estimated), where a sampled key already in the query's
    block is not counted twice. Causal: the paper's recursion: the causal matrix splits into two
    causal halves (recursed) and an off-diagonal block computed non-causally, merged by
    log-sum-exp, down to ``min_seq_len`` where attention is exact. Randomness is seeded by ``seed``.
    Self-attention. q (B, Hq, N, D), k/v (B, Hkv, N, D|Dv). Cost O(N (b + m) D log N)."""

    info = MethodInfo(
        name="hyper", title="HyperAttention: Long-context Attention in Near-Linear Time", arxiv="2310.05868",
        family=("dynamic",), causal=True, non_causal=True, cross=False, gqa=True, training_free=True,
        time="O(N (b + m) D log N)", memory="O(N (b + m)) scores per level",
        summary="sortLSH blocks for large entries + uniform column sampling; causal recursion",
    )

    @dataclass
    class Config:
        block_size: int = 64
        sample_size: int = 64
        num_projections: int = 7
        min_seq_len: int = 256
        seed: int = 0

        def __post_init__(self):
            self.block_size = check_int("block_size", self.block_size)
            self.sample_size = check_int("sample_size", self.sample_size)
            self.num_projections = check_int("num_projections", self.num_projections)
            self.min_seq_len = check_int("min_seq_len", self.min_seq_len, minimum=2)
            self.seed = check_int("seed", self.seed, minimum=0)

    # ---- the decisions (shared by the fast path and the reference) --------------------------
    def _hash_order(self, x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
        bits = (x.float() @ planes > 0).long()
        code = (bits << torch.arange(planes.shape[1], device=x.device)).sum(-1)
        return torch.sort(_gray_rank(code, planes.shape[1]), dim=-1, stable=True).indices

    def pieces(self, q, k, call: Call) -> list[_Piece]:
        """The sub-problems of this call (one for non-causal, the recursion's off-diagonal blocks
        and exact diagonal leaves for causal), with their LSH orders and samples."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        planes = torch.randn(call.dim, cfg.num_projections, generator=gen).to(q.device)
        k = repeat_kv(k, call.groups)
        out: list[_Piece] = []

        def noncausal(q0: int, k0: int, n: int) -> None:
            if n <= cfg.min_seq_len or n <= cfg.block_size + cfg.sample_size:
                out.append(_Piece("exact", q0, k0, n, n))
                return
            qs = self._hash_order(q[:, :, q0 : q0 + n], planes)
            ks = self._hash_order(k[:, :, k0 : k0 + n], planes)
            samples = torch.randperm(n, generator=gen)[: cfg.sample_size].to(q.device)
            out.append(_Piece("lsh", q0, k0, n, n, qs, ks, samples))

        def causal(a: int, n: int) -> None:
            if n <= cfg.min_seq_len:
                out.append(_Piece("causal", a, a, n, n))
                return
            h = n // 2
            causal(a, h)
            noncausal(a + h, a, h)  # queries [a + h, a + 2h) against keys [a, a + h)
            if n % 2:  # odd length: the last query's row of the off-diagonal block, exactly
                out.append(_Piece("exact", a + n - 1, a, 1, h))
            causal(a + h, n - h)

        if call.causal:
            causal(0, call.len_q)
        else:
            noncausal(0, 0, call.len_q)
        return out

    # ---- one sub-problem's entries as (scores, values) with log-weights ---------------------
    def _piece_bias(self, piece: _Piece, call: Call) -> torch.Tensor:
        """(B|1, H|1, rows, cols) additive log-weight of the piece's entries, -inf where not attended
        (float64, cast by the caller: log(n / m) must not round to float32 in a float64 reference)."""
        dev = call.device
        if piece.kind == "causal":
            return torch.where(causal_mask(piece.rows, piece.cols, dev), 0.0, float("-inf")).double()[None, None]
        if piece.kind == "exact":
            return torch.zeros(1, 1, piece.rows, piece.cols, dtype=torch.float64, device=dev)
        n, b, m = piece.rows, self.config.block_size, piece.samples.numel()
        q_block = torch.empty_like(piece.q_sorted)
        q_block.scatter_(-1, piece.q_sorted, torch.arange(n, device=dev).expand_as(piece.q_sorted) // b)
        k_block = torch.empty_like(piece.k_sorted)
        k_block.scatter_(-1, piece.k_sorted, torch.arange(n, device=dev).expand_as(piece.k_sorted) // b)
        lsh = q_block[..., :, None] == k_block[..., None, :]
        sampled = torch.zeros(n, dtype=torch.bool, device=dev)
        sampled[piece.samples] = True
        bias = torch.full(lsh.shape, float("-inf"), dtype=torch.float64, device=dev)
        bias = torch.where(sampled[None, None, None, :] & ~lsh, math.log(n / m), bias)
        return torch.where(lsh, 0.0, bias)

    def _entries(self, piece: _Piece) -> float:
        """Entries the piece attends to, per head (mean over batch and heads), without forming them."""
        if piece.kind == "causal":
            return piece.rows * (piece.rows + 1) / 2
        if piece.kind == "exact":
            return float(piece.rows * piece.cols)
        n, b, m = piece.rows, self.config.block_size, piece.samples.numel()
        sizes = torch.clamp(n - torch.arange(-(-n // b), device=piece.samples.device) * b, max=b).double()
        k_rank = torch.empty_like(piece.k_sorted)
        k_rank.scatter_(-1, piece.k_sorted, torch.arange(n, device=k_rank.device).expand_as(k_rank))
        inside = torch.nn.functional.one_hot(k_rank[..., piece.samples] // b, sizes.numel()).sum(-2).double()
        return float((sizes * (sizes + m - inside)).sum(-1).mean())

    def _rows(self, piece: _Piece) -> tuple[slice, slice]:
        return slice(piece.q0, piece.q0 + piece.rows), slice(piece.k0, piece.k0 + piece.cols)

    # ---- fast path: each piece in O(n (b + m) D), merged by log-sum-exp ---------------------
    def _piece_attention(self, q, k, v, piece: _Piece, call: Call):
        rows, cols = self._rows(piece)
        qp, kp, vp = q[:, :, rows], k[:, :, cols], v[:, :, cols]
        if piece.kind != "lsh":
            scores = qp @ kp.transpose(-1, -2) * call.scale + self._piece_bias(piece, call).to(qp.dtype)
            lse = torch.logsumexp(scores, -1)
            return torch.exp(scores - lse[..., None]) @ vp, lse
        n, b, m = piece.rows, self.config.block_size, piece.samples.numel()
        nb, pad = -(-n // b), -n % b
        gather = lambda x, idx: torch.gather(x, 2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))  # noqa: E731
        qs, ks, vs = gather(qp, piece.q_sorted), gather(kp, piece.k_sorted), gather(vp, piece.k_sorted)
        padded = lambda x: torch.nn.functional.pad(x, (0, 0, 0, pad)).unflatten(2, (nb, b))  # noqa: E731
        block = padded(qs) @ padded(ks).transpose(-1, -2) * call.scale  # (B, H, nb, b, b)
        key_real = torch.arange(nb * b, device=q.device).view(nb, 1, b) < n
        block = block.masked_fill(~key_real, float("-inf")).flatten(2, 3)[:, :, :n]  # (B, H, n, b)
        sample_scores = qs @ kp[:, :, piece.samples].transpose(-1, -2) * call.scale + math.log(n / m)
        k_rank = torch.empty_like(piece.k_sorted)
        k_rank.scatter_(-1, piece.k_sorted, torch.arange(n, device=q.device).expand_as(piece.k_sorted))
        in_block = (k_rank[..., piece.samples] // b)[:, :, None, :] == (torch.arange(n, device=q.device) // b)[:, None]
        sample_scores = sample_scores.masked_fill(in_block, float("-inf"))
        lse = torch.logsumexp(torch.cat([block, sample_scores], -1), -1)
        weights = torch.exp(block - lse[..., None])
        weights = torch.nn.functional.pad(weights, (0, 0, 0, pad)).unflatten(2, (nb, b))
        out = (weights @ padded(vs)).flatten(2, 3)[:, :, :n] + torch.exp(sample_scores - lse[..., None]) @ vp[:, :, piece.samples]
        unsorted = torch.empty_like(out).scatter_(2, piece.q_sorted[..., None].expand_as(out), out)
        lse_unsorted = torch.empty_like(lse).scatter_(2, piece.q_sorted, lse)
        return unsorted, lse_unsorted

    def plan(self, q, k, call: Call) -> list[_Piece]:
        return self.pieces(q, k, call)

    def execute(self, q, k, v, call: Call, pieces: list[_Piece]) -> tuple[torch.Tensor, dict]:
        """Each piece's sorted-block and sampled attention, merged by log-sum-exp across pieces."""
        work = work_dtype(q)
        qw, kw, vw = q.to(work), repeat_kv(k, call.groups).to(work), repeat_kv(v, call.groups).to(work)
        out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=work, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=work, device=q.device)
        entries = 0.0
        for piece in pieces:  # out of place (slice_scatter), so the merge is differentiable
            rows, _ = self._rows(piece)
            o, l_piece = self._piece_attention(qw, kw, vw, piece, call)
            merged = torch.logaddexp(lse[:, :, rows], l_piece)
            rows_out = out[:, :, rows] * torch.exp(lse[:, :, rows] - merged)[..., None].nan_to_num(0.0) \
                + o * torch.exp(l_piece - merged)[..., None]
            out = out.slice_scatter(rows_out, dim=2, start=rows.start, end=rows.stop)
            lse = lse.slice_scatter(merged, dim=2, start=rows.start, end=rows.stop)
            entries += self._entries(piece)
        total = entries * call.batch * call.heads_q
        return out.to(q.dtype), {"allowed": total, "computed": total, "backend": "torch", "executor": "lsh-blocks"}

    # ---- reference: one dense softmax with the same log-weights -----------------------------
    def _bias(self, q, k, call: Call) -> torch.Tensor:
        n = call.len_q
        bias = torch.full((call.batch, call.heads_q, n, n), float("-inf"), dtype=torch.float64, device=q.device)
        for piece in self.pieces(q, k, call):
            rows, cols = self._rows(piece)
            bias[:, :, rows, cols] = self._piece_bias(piece, call).expand(call.batch, call.heads_q, -1, -1)
        return bias

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        return naive.hyper_reference(q, k, v, scale=call.scale, causal=call.causal, **dataclasses.asdict(self.config))

    def _support(self, q, k, v, call: Call) -> torch.Tensor:
        return torch.isfinite(self._bias(q, k, call))

