"""SeerAttention: a learned block gate (AttnGate) picks the key blocks; block-sparse attention runs there."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InvalidArgumentError, check_float, check_int
from ...kernels.dense import exact_probabilities, repeat_kv, work_dtype
from ...method import Call, MethodInfo
from ...nn import apply_rope
from ...registry import register
from ..dynamic.base import BlockSelectionMethod, TopKConfig, clamp_budget
from ..dynamic.scoring import allowed_blocks, block_means, forced_blocks, top_blocks
from . import naive
from .base import LearnedPart


def block_extremes(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, N, D) -> (max, min) over each block of ``block`` tokens, each (B, H, ceil(N / block), D);
    a ragged last block over its own tokens."""
    pad = -x.shape[2] % block
    padded = F.pad(x, (0, 0, 0, pad), value=float("nan")).unflatten(2, (-1, block))
    return padded.nan_to_num(float("-inf")).amax(3), padded.nan_to_num(float("inf")).amin(3)


POOLS = ("max", "sum")


def block_max_target(q: torch.Tensor, k: torch.Tensor, *, causal: bool, scale: float, block: int, pool: str = "max") -> torch.Tensor:
    """SeerAttention's training target (B, Hq, nQB, nKB): the exact attention probabilities of q
    (B, Hq, Nq, D) over k (B, Hkv, Nk, D) max-pooled over block x block tiles (``pool="sum"``: summed,
    the tile's attention mass, what a selection's recall counts), each row normalised to sum to one
    (rows of query blocks are computed a few at a time: O(block Nk) memory per head)."""
    if pool not in POOLS:
        raise InvalidArgumentError("pool", f"one of {POOLS}", repr(pool))
    nkb = -(-k.shape[2] // block)
    rows = []
    for span, probs in exact_probabilities(q, k, causal=causal, scale=scale, chunk=block * max(1, 512 // block)):
        probs = F.pad(probs, (0, nkb * block - k.shape[2], 0, -probs.shape[2] % block))
        tiles = probs.unflatten(3, (nkb, block)).unflatten(2, (-1, block))  # (B, H, qb, block, nkb, block)
        rows.append(tiles.amax((3, 5)) if pool == "max" else tiles.sum((3, 5)))
    pooled = torch.cat(rows, dim=2)
    return pooled / pooled.sum(-1, keepdim=True).clamp_min(torch.finfo(pooled.dtype).tiny)


class AttnGate(nn.Module):
    """SeerAttention's AttnGate, one per layer: queries average-pooled per block, keys max-, min- and
    average-pooled (concatenated), a linear layer per query head on each, rotary embeddings at block
    positions, and block logits (B, Hq, nQB, nKB) of their scaled dot products. Initialised so the
    logits are those of mean-pooled q against mean-pooled k (MInference's estimator) up to the RoPE."""

    def __init__(self, heads: int, dim: int, gate_dim: int | None = None, rope_base: float = 10000.0):
        super().__init__()
        heads, dim = check_int("heads", heads), check_int("dim", dim)
        gate_dim = dim if gate_dim is None else check_int("gate_dim", gate_dim)
        if gate_dim % 2:
            raise InvalidArgumentError("gate_dim", "an even number (rotary embeddings rotate channel pairs)", gate_dim)
        eye = torch.eye(dim, gate_dim)
        self.query = nn.Parameter(eye.repeat(heads, 1, 1))  # (H, D, G)
        self.key = nn.Parameter(torch.cat([torch.zeros(2 * dim, gate_dim), eye]).repeat(heads, 1, 1))  # (H, 3D, G): max, min, avg
        self.rope_base = rope_base

    def inputs(self, q: torch.Tensor, k: torch.Tensor, call: Call, block: int) -> dict:
        """What the gate reads of q and k, none of it a parameter: ``pooled_q``, q mean-pooled per block
        (B, Hq, nQB, D); ``pooled_k``, k max-, min- and mean-pooled (B, Hq, nKB, 3D), shared across each
        GQA group; ``offset``, the first query block's position in key blocks (bottom-right alignment);
        ``allowed`` (nQB, nKB), the key blocks each query block may see."""
        if q.shape[1] != self.query.shape[0] or q.shape[-1] != self.query.shape[1]:
            raise InvalidArgumentError("q", f"{self.query.shape[0]} query heads of dim {self.query.shape[1]} (the gate's shapes)",
                                       f"{q.shape[1]} heads of dim {q.shape[-1]}")
        kmax, kmin = block_extremes(k.to(work_dtype(q)), block)
        return {"pooled_q": block_means(q, block), "pooled_k": repeat_kv(torch.cat([kmax, kmin, block_means(k, block)], dim=-1), call.groups),
                "offset": (call.len_kv - call.len_q) / block, "allowed": allowed_blocks(call, block, block)}

    def logits(self, pooled_q: torch.Tensor, pooled_k: torch.Tensor, offset: float, allowed: torch.Tensor) -> torch.Tensor:
        """Block logits (B, Hq, nQB, nKB) from :meth:`inputs`, -inf where ``allowed`` is False."""
        gq = pooled_q @ self.query.to(pooled_q.dtype)
        gk = pooled_k @ self.key.to(pooled_k.dtype)
        gq = apply_rope(gq, torch.arange(gq.shape[2], device=gq.device, dtype=gq.dtype) + offset, self.rope_base)
        gk = apply_rope(gk, torch.arange(gk.shape[2], device=gk.device, dtype=gk.dtype), self.rope_base)
        return (gq @ gk.transpose(-1, -2) * gq.shape[-1] ** -0.5).masked_fill(~allowed, float("-inf"))

    def forward(self, q: torch.Tensor, k: torch.Tensor, call: Call, block: int) -> torch.Tensor:
        """Block logits (B, Hq, nQB, nKB), -inf where a query block may not look (causal)."""
        return self.logits(**self.inputs(q, k, call, block))


@register
class Seer(LearnedPart, BlockSelectionMethod):
    """SeerAttention ("SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs", arXiv
    2410.13276): a small learned gate (:class:`AttnGate`) scores key blocks from pooled q and k; each
    query block attends exactly (block-sparse executor) to its ``top_k`` best key blocks, or, with
    ``threshold``, to the blocks whose gate probability (softmax over key blocks) is at least it;
    the diagonal block (causal), the first block and ``local_blocks`` neighbours are always kept.
    The gate is distilled (``attnzoo distill --method seer``) to :func:`block_max_target` of the
    frozen model. q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv) -> (B, Hq, Nq, Dv)."""

    info = MethodInfo(
        name="seer", title="SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs", arxiv="2410.13276",
        family=("dynamic", "learned"), causal=True, non_causal=True, cross=True, gqa=True, training_free=False,
        time="O(N^2 D / b^2 + N k b D)", memory="O(N^2 / b^2 + N k b) per head",
        summary="learned AttnGate on pooled q/k picks key blocks (top-k or threshold); block-sparse attention",
    )

    @dataclass
    class Config(TopKConfig):
        """``threshold``: None (keep ``top_k`` blocks) or a gate probability in (0, 1]; ``gate_dim``: the
        gate's width (default: head dim); ``rope_base``: the base of its block-position rotary embeddings;
        ``target``: the map the gate is distilled to, the attention map ``"max"``-pooled over tiles
        (SeerAttention's) or ``"sum"``-pooled (each tile's attention mass) (:func:`block_max_target`)."""

        threshold: float | None = None
        gate_dim: int | None = None
        rope_base: float = 10000.0
        target: str = "max"

        def __post_init__(self):
            super().__post_init__()
            if self.threshold is not None:
                self.threshold = check_float("threshold", self.threshold, low=0.0, high=1.0, low_open=True)
            if self.gate_dim is not None:
                self.gate_dim = check_int("gate_dim", self.gate_dim)
            self.rope_base = check_float("rope_base", self.rope_base, low=1.0, high=float("inf"), low_open=True)
            if self.target not in POOLS:
                raise InvalidArgumentError("target", f"one of {POOLS}", repr(self.target))

    part_name = "gate"

    def __init__(self, **config):
        super().__init__(**config)
        self.gate: AttnGate | None = None

    def new_part(self, heads: int, dim: int) -> AttnGate:
        return AttnGate(heads, dim, self.config.gate_dim, self.config.rope_base)

    def gate_logits(self, q, k, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
        """The gate's block logits (B, Hq, nQB, nKB) (-inf where causality forbids), differentiable."""
        call = self._prepare(q, k, k, causal, scale, check_finite=False)
        return self.part(call)(q, k, call, self.config.block_size)

    def gate_inputs(self, q, k, *, causal: bool = False, scale: float | None = None) -> dict:
        """:meth:`AttnGate.inputs` of q and k, without gradient; the distillation keeps it per training example."""
        call = self._prepare(q, k, k, causal, scale, check_finite=False)
        with torch.no_grad():
            return self.part(call).inputs(q, k, call, self.config.block_size)

    def gate_logits_from(self, inputs: dict) -> torch.Tensor:
        """The learned gate's block logits from :meth:`gate_inputs` (other entries are ignored),
        differentiable in its parameters."""
        if self.gate is None:
            raise InvalidArgumentError("gate", "a learned gate (materialize() or weights=)", None)
        return self.gate.logits(inputs["pooled_q"], inputs["pooled_k"], inputs["offset"], inputs["allowed"])

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        """The AttnGate and its selection written literally (:mod:`.naive`), with this gate's parameters."""
        return naive.seer_reference(q, k, v, self.part(call), self.config, causal=call.causal, scale=call.scale)

    def _select(self, q, k, call: Call) -> torch.Tensor:
        b = self.config.block_size
        with torch.no_grad():
            scores = torch.softmax(self.part(call)(q, k, call, b), dim=-1)
        scores = torch.nan_to_num(scores, nan=0.0).masked_fill(~allowed_blocks(call, b, b), float("-inf"))
        if self.config.threshold is None:
            budget = clamp_budget(self.info.name, "top_k", self.config.top_k, scores.shape[-1])
        else:
            budget = scores.shape[-1]
            scores = scores.masked_fill(scores < self.config.threshold, float("-inf"))
        forced = forced_blocks(call, b, b, self.config.local_blocks)  # (nQB, F), most important first
        rank = torch.arange(forced.shape[1], 0, -1, dtype=scores.dtype, device=scores.device).expand_as(forced)
        bonus = torch.zeros(forced.shape[0], scores.shape[-1] + 1, dtype=scores.dtype, device=scores.device)
        bonus.scatter_reduce_(1, torch.where(forced >= 0, forced, scores.shape[-1]), rank, "amax")  # holes: a spare column
        bonus = bonus[:, :-1]
        scores = torch.where((bonus > 0) & allowed_blocks(call, b, b), 1.0 + bonus, scores)  # above every probability, in order
        return top_blocks(scores, budget)
