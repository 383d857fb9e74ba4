"""One capture hook for every consumer (eval, analysis, distillation): what attention layers receive and attend.

``with capture(model, layers, probs=True) as cap: model(...)`` records, per layer and call, the
post-RoPE q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D) the model's attention function receives and,
on request, the attention probabilities (B, Hq, Nq, Nk). Works on unpatched models (a temporary
empty patch routes attention through attnzoo and is removed on exit; every layer still runs
transformers' SDPA) and on patched ones: there a layer whose plan runs reports its methods'
probabilities (the exact softmax restricted to each method's ``.support``, see
:func:`~attnzoo.integrations.transformers.plan.method_probabilities`; exact on heads without a
method); layers and calls the model's own attention runs report the exact softmax under the
model's mask (causal, padding, sliding window). With ``output=True`` the recorder computes the
layer's attention itself and keeps the output in the autograd graph, so that a backward pass
gives dL/d(attention output) per layer (MoA's influence, :mod:`attnzoo.cache.moa_search`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ...errors import InvalidArgumentError, UnsupportedError
from ...kernels.dense import attention_probabilities, causal_mask, sdpa
from .adapter import CAPTURE_ATTR, attention_modules, current_patch, install, unpatch
from .padding import bool_mask
from .plan import LayerPlan, layer_index


@dataclass
class AttentionRecord:
    """One attention call of one layer. ``q`` (B, Hq, Nq, D), ``k`` and ``v`` (B, Hkv, Nk, D) as
    the attention function received them (post-RoPE; GQA key/value heads not repeated); ``mask``:
    the model's mask as booleans (B|1, 1, Nq, Nk), True = attend, or None; ``probs`` (B, Hq, Nq,
    Nk) float32 attention probabilities; ``plan``: the head groups that ran
    (:meth:`LayerPlan.describe`), None where the model's own attention ran; ``output`` (B, Hq, Nq,
    Dv): the attention output, not detached (its ``.grad`` is kept), with ``capture(output=True)``."""

    layer: int
    causal: bool
    scale: float
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    plan: list[dict[str, Any]] | None = None
    output: torch.Tensor | None = None


def model_probabilities(q, k, mask: torch.Tensor | None, causal: bool, scale: float) -> torch.Tensor:
    """(B, Hq, Nq, Nk) softmax probabilities of the model's own attention under its ``mask``
    (B|1, 1, Nq, Nk), or the causal (bottom-right) or full pattern where it passes none."""
    if mask is not None:
        allowed = bool_mask(mask)
    else:
        allowed = causal_mask(q.shape[2], k.shape[2], q.device) if causal else None
    return attention_probabilities(q, k, scale=scale, mask=allowed)


class Capture:
    """What :func:`capture` records: ``records[layer]`` holds the layer's :class:`AttentionRecord`
    per call, in call order. A context manager; :meth:`close` stops recording."""

    def __init__(self, model, layers: list[int], *, qkv: bool, probs: bool, output: bool, prefill_only: bool, device):
        self.model, self.qkv, self.probs, self.output = model, qkv, probs, output
        self.prefill_only, self.device = prefill_only, device
        self.records: dict[int, list[AttentionRecord]] = {i: [] for i in layers}
        self._modules = {layer.index: layer.module for layer in attention_modules(model)}
        if any(hasattr(m, CAPTURE_ATTR) for m in self._modules.values()):
            raise InvalidArgumentError("model", "a model without an open capture", "one already capturing")
        self._own_patch = install(model, {}) if current_patch(model) is None else None
        for i in layers:
            setattr(self._modules[i], CAPTURE_ATTR, partial(self._record, i))

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t if self.device is None else t.to(self.device)

    def _record(self, layer: int, q, k, v, mask, causal: bool, scale: float, plan: LayerPlan | None) -> torch.Tensor | None:
        if self.prefill_only and q.shape[2] != k.shape[2]:
            return None
        if self.output and plan is not None:
            raise UnsupportedError(f"capture(output=True) computes the model's own attention, but layer {layer} is patched; unpatch it first")
        record = AttentionRecord(layer, causal, scale, plan=None if plan is None else plan.describe())
        if self.qkv:
            record.q, record.k, record.v = self._keep(q), self._keep(k), self._keep(v)
            record.mask = None if mask is None else self._keep(bool_mask(mask))
        if self.probs:
            with torch.no_grad():
                p = plan.probabilities(q, k, v, mask, causal, scale) if plan is not None else model_probabilities(q, k, mask, causal, scale)
            record.probs = self._keep(p)
        self.records[layer].append(record)
        if not self.output:
            return None
        record.output = sdpa(q, k, v, causal=causal, scale=scale, mask=None if mask is None else bool_mask(mask))
        if record.output.requires_grad:
            record.output.retain_grad()
        return record.output

    def first(self, layer: int) -> AttentionRecord:
        """The layer's first recorded call."""
        if not self.records.get(layer):
            raise InvalidArgumentError("layer", f"a captured layer with a recorded call (captured: {sorted(self.records)})", layer)
        return self.records[layer][0]

    def close(self) -> None:
        """Stop recording; remove the temporary patch if it is still the model's."""
        for module in self._modules.values():
            if hasattr(module, CAPTURE_ATTR):
                delattr(module, CAPTURE_ATTR)
        if self._own_patch is not None and current_patch(self.model) is self._own_patch:
            unpatch(self.model)
        self._own_patch = None

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def capture(model, layers: Iterable[int] | None = None, *, qkv: bool = True, probs: bool = False, output: bool = False,
            prefill_only: bool = True, device: str | torch.device | None = "cpu") -> Capture:
    """Start recording the attention calls of ``layers`` (default all) of a transformers ``model``.

    ``qkv``: keep q, k, v and the mask; ``probs``: compute the attention probabilities (B, Hq, Nq,
    Nk), O(Nq Nk) memory per head (see the module docstring for what they are in patched layers);
    ``output``: attend in the recorder (exact attention under the model's mask; refused on patched
    layers) and keep each output in the autograd graph, its gradient retained; ``prefill_only``:
    skip calls with fewer queries than keys (decode steps); ``device``: where the records go (None:
    stay on the model's device). Tensors other than ``output`` are detached. Returns a
    :class:`Capture`."""
    if not (qkv or probs):
        raise InvalidArgumentError("qkv, probs", "at least one of them True (nothing to record otherwise)", "both False")
    indices = [layer.index for layer in attention_modules(model)]
    chosen = indices if layers is None else [layer_index(i, indices, "layers") for i in layers]
    return Capture(model, chosen, qkv=qkv, probs=probs, output=output, prefill_only=prefill_only, device=device)
