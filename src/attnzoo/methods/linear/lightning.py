"""Lightning Attention: conventional attention inside blocks, the kernel trick across blocks, decay."""

from __future__ import annotations

from dataclasses import dataclass

from ...method import Call, MethodInfo
from ...registry import register
from . import naive
from .base import KernelizedConfig
from .decay import check_decay, decay_for
from .linear import Linear


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

    def _reference(self, q, k, v, call):
        decay = naive.lightning_decay(self.config.decay, call.heads_q) if call.causal else None
        return naive.kernelized_reference(q, k, v, feature_map=self.config.feature_map, causal=call.causal, eps=self.config.eps,
                                          normalize=False, decay=decay)
