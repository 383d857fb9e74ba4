"""InLine: injective linear attention plus a local attention residual."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import check_int
from ...kernels.dense import work_dtype
from ...kernels.linear import state_product
from ...method import Call, MethodInfo
from ...registry import register
from ..local.sliding_window import SlidingWindow
from . import naive
from .base import KernelizedConfig
from .linear import Linear


@dataclass
class InLineConfig(KernelizedConfig):
    """``feature_map`` phi (default ``identity``: InLine needs no positive kernel); ``window``:
    keys of the local residual (softmax attention over the ``window`` nearest keys: centred, or the
    most recent when causal); 0 turns the residual off."""

    feature_map: str = "identity"
    window: int = 9

    def __post_init__(self):
        super().__post_init__()
        self.window = check_int("window", self.window, minimum=0)


@register
class InLine(Linear):
    """InLine attention ("Bridging the Divide: Reconsidering Softmax and Linear Attention", arXiv
    2412.06590). Injective weights ``w_ij = (scale / n_i) (phi(q_i) phi(k_j) - (1/n_i) sum_s
    phi(q_i) phi(k_s)) + 1/n_i`` (n_i visible keys: subtract the mean instead of dividing by the
    sum, so rows still sum to one but queries of different norm stay distinguishable; the factor
    scale / n_i is the official code's, which Eq. 5 omits "for simplicity"), ``O_inline = sum_j
    w_ij v_j``, plus a local residual. The paper predicts the 9 local weights with an MLP on the
    block input; attnzoo uses softmax attention over a ``window`` of nearby keys (the
    ``sliding_window`` method).
    Causal sums run over j <= i. q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv) -> (B, Hq, Nq, Dv)."""

    info = MethodInfo(
        name="inline", title="Bridging the Divide: Reconsidering Softmax and Linear Attention", arxiv="2412.06590",
        family=("linear",), causal=True, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(N D Dv + N w D)", memory="O(N (D + Dv))",
        summary="injective linear attention (mean-subtracted weights) plus a local softmax residual",
    )
    Config = InLineConfig

    def __init__(self, **config):
        super().__init__(**config)
        self._local = SlidingWindow(window=self.config.window) if self.config.window else None

    @staticmethod
    def _visible(call: Call, like: torch.Tensor) -> torch.Tensor:
        """(Nq, 1) number of keys each query sees (at least 1), in the work dtype of ``like``."""
        pos = torch.arange(call.len_q, device=like.device)[:, None] + (call.len_kv - call.len_q) + 1
        seen = pos.clamp(1, call.len_kv) if call.causal else torch.full_like(pos, call.len_kv)
        return seen.to(work_dtype(like))

    def _inline(self, q, k, v, call: Call, product) -> torch.Tensor:
        """``(scale / n) num + vsum (1 - scale den / n) / n`` from the unnormalised product of [v, 1]
        and of [v] with phi = 1 (the visible value sums); rows that see no key give 0."""
        qf, kf = self.features(q, k, call)
        ones_q, ones_k = torch.ones_like(q[..., :1]), torch.ones_like(k[..., :1])
        v_aug = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        num_den = product(qf, kf, v_aug)
        value_sum = product(ones_q, ones_k, v)
        n = self._visible(call, q)
        injective = num_den * (call.scale / n)
        return injective[..., :-1] + value_sum * (1 - injective[..., -1:]) / n

    def _with_local(self, out, q, k, v, call: Call):
        if self._local is not None:  # inputs were checked once by this call
            local = self._local(q, k, v, causal=call.causal, scale=call.scale, check_finite=False)
            out = out + local.to(out.dtype)
        return out.to(q.dtype)

    def _forward(self, q, k, v, call: Call):
        product = lambda a, b, c: state_product(a, b, c, causal=call.causal, chunk=self.config.chunk, backend=self.backend)  # noqa: E731
        return self._with_local(self._inline(q, k, v, call, product), q, k, v, call)

    def _reference(self, q, k, v, call: Call):
        return naive.inline_reference(q, k, v, feature_map=self.config.feature_map, window=self.config.window, scale=call.scale,
                                      causal=call.causal)
