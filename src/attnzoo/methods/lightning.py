"""Lightning Attention: conventional attention inside blocks, the kernel trick across blocks, decay."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError, UnsupportedError
from ..method import Call, MethodInfo
from ..registry import register
from .linear import KernelizedConfig, Linear


def alibi_decay(heads: int) -> torch.Tensor:
    """TransNormerLLM / Lightning per-head decay ``lambda_h = exp(-2^(-8 (h+1) / H))``."""
    return torch.exp(-(2.0 ** (-8.0 * torch.arange(1, heads + 1, dtype=torch.float64) / heads))).float()


def check_decay(value):
    """Config check for ``decay``: None, ``"alibi"``, one factor or one per query head, in (0, 1]."""
    if value is None or value == "alibi":
        return value
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if not values or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not (0 < x <= 1) for x in values):
        raise InvalidArgumentError("decay", "None, 'alibi', a factor in (0, 1] or one per head", repr(value))
    return tuple(float(x) for x in values) if len(values) > 1 else float(values[0])


def decay_for(value, call: Call) -> torch.Tensor | None:
    """The (Hq,) decay tensor of a checked ``decay`` setting (None: no decay)."""
    if value is None:
        return None
    if not call.causal:
        raise UnsupportedError("decay needs causal=True (the decay lambda^(i-j) is defined for keys j <= i)")
    if value == "alibi":
        return alibi_decay(call.heads_q)
    if isinstance(value, tuple):
        if len(value) != call.heads_q:
            raise InvalidArgumentError("decay", f"one factor per query head ({call.heads_q})", f"{len(value)} factors")
        return torch.tensor(value)
    return torch.full((call.heads_q,), value)


@dataclass
class LightningConfig(KernelizedConfig):
    """``decay``: None (none), ``"alibi"`` (TransNormerLLM's per-head rates), one factor in
    (0, 1] for every head or a sequence with one per query head; causal only. ``feature_map``
    applied to q and k (default ``identity``: the Lightning operator on given q, k); ``chunk``:
    the block size (intra-block quadratic, inter-block state)."""

    feature_map: str = "identity"
    decay: object = None

    def __post_init__(self):
        super().__post_init__()
        self.decay = check_decay(self.decay)


@register
class Lightning(Linear):
    """Lightning Attention ("Various Lengths, Constant Speed: Efficient Language Modeling with
    Lightning Attention", arXiv 2405.17381; Lightning Attention-2, arXiv 2401.04658): the
    unnormalised ``O = [(phi(Q) phi(K)^T) * M] V`` with ``M_ij = lambda_h^(i-j)`` (j <= i), computed
    blockwise: conventional attention inside blocks, the kernel trick across blocks (the shared
    chunked executor; the Triton kernel on CUDA). Non-causal calls (no decay) use ``phi(Q)(phi(K)^T
    V)``. No normalisation (TransNormerLLM normalises the output outside). ``scale`` is unused."""

    info = MethodInfo(
        name="lightning", title="Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention",
        arxiv="2405.17381", family=("linear",), causal=True, non_causal=True, cross=True, gqa=True,
        training_free=True, time="O(N C D + N D Dv)", memory="O(N (D + Dv))",
        summary="intra-block conventional + inter-block linear attention, per-head decay",
    )
    Config = LightningConfig
    normalize = False

    def check(self, call: Call) -> None:
        decay_for(self.config.decay, call)

    def decay(self, call: Call):
        return decay_for(self.config.decay, call)
