"""ACT: exact attention with the hidden sinks beyond the first token calibrated (Yu et al., ICML 2024, arXiv 2406.15765).

ACT finds, per head and per input, the keys whose attention received, averaged over the queries
that see them, exceeds a threshold (``attnzoo.analysis.sinks``); every such sink except the first
token keeps ``beta`` of its attention, and each query row gives the mass removed back to its
other keys in proportion to their attention. Which heads to calibrate is chosen on calibration
text (:func:`attnzoo.integrations.transformers.act.act_search`), written as an
``attnzoo-patterns/1`` config that ``attnzoo.patch(model, "act", config=...)`` loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...analysis.sinks import sinks
from ...errors import UnsupportedError, check_float
from ...kernels.dense import attention_probabilities, causal_mask, repeat_kv
from ...method import Call, Method, MethodInfo
from ...registry import register


def sink_columns(probs: torch.Tensor, *, causal: bool, threshold: float) -> torch.Tensor:
    """(B, H, Nk) bool: ACT's sinks of probabilities (B, H, Nq, Nk), the first key excluded (never calibrated)."""
    is_sink = sinks(probs, causal=causal, threshold=threshold).is_sink
    is_sink[..., 0] = False
    return is_sink


def calibrate(probs: torch.Tensor, is_sink: torch.Tensor, beta: float) -> torch.Tensor:
    """probs (B, H, Nq, Nk) with the columns ``is_sink`` (B, H, Nk) scaled by ``beta`` and every row's
    other keys scaled up so the row keeps its sum: a row with sink mass s and other mass r gets its
    other keys times (r + (1 - beta) s) / r. Rows with no other mass are left as they are."""
    sink = is_sink[..., None, :]
    other = probs.masked_fill(sink, 0.0)
    sink_mass = (probs - other).sum(dim=-1, keepdim=True)
    other_mass = other.sum(dim=-1, keepdim=True)
    grow = (other_mass + (1.0 - beta) * sink_mass) / other_mass.clamp_min(torch.finfo(probs.dtype).tiny)
    calibrated = torch.where(sink, probs * beta, probs * grow)
    return torch.where(other_mass > 0, calibrated, probs)


@register
class ACT(Method):
    """Exact softmax attention with ACT's calibration of sinks beyond the first token.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv). Sinks are judged on
    the call's own queries (a prefill: the prompt; a decode step: its one query), as ACT's code
    does per input. ``threshold``: a key is a sink when its mean received attention exceeds it
    (ACT: 0.1); ``beta``: the fraction of a sink's attention kept (ACT: 0.4).
    """

    info = MethodInfo(
        name="act",
        title="Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without Training "
              "through Attention Calibration",
        arxiv="2406.15765", family=("decode",),
        causal=True, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(Nq Nk D)", memory="O(Nq Nk) per head (the probabilities are materialised to find the sinks)",
        summary="exact attention; sinks beyond the first token keep beta of their attention, the rest goes to the other keys",
    )

    @dataclass
    class Config:
        threshold: float = 0.1
        beta: float = 0.4

        def __post_init__(self):
            self.threshold = check_float("threshold", self.threshold, low=0.0, high=1.0)
            self.beta = check_float("beta", self.beta, low=0.0, high=1.0)

    def _probabilities(self, q, k, call: Call) -> torch.Tensor:
        mask = causal_mask(call.len_q, call.len_kv, q.device) if call.causal else None
        return attention_probabilities(q, k, scale=call.scale, mask=mask)

    def _forward(self, q, k, v, call: Call):
        probs = self._probabilities(q, k, call)
        probs = calibrate(probs, sink_columns(probs, causal=call.causal, threshold=self.config.threshold), self.config.beta)
        return torch.matmul(probs, repeat_kv(v, call.groups).to(probs.dtype)).to(q.dtype)

    def _reference(self, q, k, v, call: Call):
        """ACT's redistribution as its code writes it: sinks times beta, plus each row's removed
        mass spread over the row's other keys in proportion to their attention."""
        probs = self._probabilities(q, k, call)
        sink = sink_columns(probs, causal=call.causal, threshold=self.config.threshold)[..., None, :]
        removed = (probs * sink).sum(dim=-1, keepdim=True) * (1.0 - self.config.beta)
        others = probs * ~sink
        share = others / others.sum(dim=-1, keepdim=True)
        calibrated = torch.where(sink, probs * self.config.beta, probs) + removed * share.nan_to_num(0.0)
        return torch.matmul(calibrated, repeat_kv(v, call.groups).to(probs.dtype)).to(q.dtype)

    @staticmethod
    def patch_plans(found, config):
        """{layer: LayerPlan} for ``attnzoo.patch(model, "act", config=...)`` on the model's layers
        ``found``: ``config`` the ``attnzoo-patterns/1`` file or dict
        :func:`~attnzoo.integrations.transformers.act.act_search` writes (``act`` and ``dense`` heads only)."""
        from ...integrations.transformers.plan import build_plans

        plans = build_plans(found, "auto", None, None, "auto", {"config": config})
        names = {group.method.info.name for plan in plans.values() for group in plan.groups}
        if not names <= {"act", "dense"}:
            raise UnsupportedError(f"patch(model, 'act', config=...): the config names methods {sorted(names)}; an ACT config "
                                   "names only 'act' and 'dense' (run other patterns with patch(model, 'auto', config=...))")
        return plans
