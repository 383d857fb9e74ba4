"""EchoAtt inside a transformers model: echo layers reuse an earlier layer's attention probabilities.

The hand-over within one forward is a :class:`SharedMaps` object that both layers' plans hold:
the source layer's plan (:class:`SourcePlan`) leaves its post-RoPE queries and keys there (they
define its probabilities; handing them over costs no N x N map), the echo layer's plan
(:class:`EchoPlan`) runs the ``echo`` method on them with its own values. Layers run in order, so
every forward (prefill or decode step) overwrites the source's entry before its echo layers read it.
:func:`echo_search` chooses the echo layers on calibration text from
:func:`attnzoo.analysis.layer_similarity`; EchoAtt's fine-tuning (distillation from the
unshared teacher, and dropping the echo layers' q / k projections) is not part of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...errors import InvalidArgumentError, UnsupportedError, check_int
from ...registry import get_method
from .plan import AttentionLayer, HeadGroup, LayerPlan, layer_index

ECHO_FORMAT = "attnzoo-echo/1"


class SharedMaps:
    """The (q, k) each source layer attended with in the current forward, by layer index."""

    def __init__(self):
        self._maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def put(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        self._maps[layer] = (q, k)

    def get(self, source: int, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's (q, k), checked against the echo layer's own q (B, Hq, Nq, D) and k (B, Hkv, Nk, D)."""
        if source not in self._maps:
            raise UnsupportedError(f"echo: layer {layer} reuses layer {source}'s attention, which has not run in this model")
        qs, ks = self._maps[source]
        if qs.shape != q.shape or ks.shape != k.shape:
            raise UnsupportedError(f"echo: layer {layer}'s call (q {tuple(q.shape)}, k {tuple(k.shape)}) does not match the last "
                                   f"call of its source layer {source} (q {tuple(qs.shape)}, k {tuple(ks.shape)})")
        return qs, ks


@dataclass
class SourcePlan(LayerPlan):
    """Exact attention (the ``echo`` method on the layer's own q, k) that leaves its (q, k) in
    ``maps`` for the echo layers."""

    layer: int = 0
    maps: SharedMaps = field(default_factory=SharedMaps, repr=False)

    def __call__(self, q, k, v, mask, causal: bool, scale: float, window: int | None = None):
        self.maps.put(self.layer, q, k)
        return super().__call__(q, k, v, mask, causal, scale, window)

    def describe(self) -> list[dict[str, Any]]:
        return [{**row, "echo_source": True} for row in super().describe()]


@dataclass
class EchoPlan(LayerPlan):
    """The ``echo`` method on layer ``source``'s (q, k) from ``maps`` and this layer's values."""

    layer: int = 0
    source: int = 0
    maps: SharedMaps = field(default_factory=SharedMaps, repr=False)

    def __call__(self, q, k, v, mask, causal: bool, scale: float, window: int | None = None):
        return super().__call__(*self.maps.get(self.source, self.layer, q, k), v, mask, causal, scale, window)

    def probabilities(self, q, k, v, mask, causal: bool, scale: float) -> torch.Tensor:
        return super().probabilities(*self.maps.get(self.source, self.layer, q, k), v, mask, causal, scale)

    def describe(self) -> list[dict[str, Any]]:
        return [{**row, "source_layer": self.source} for row in super().describe()]


def load_echo_config(source: str | os.PathLike | Mapping) -> Mapping:
    """The ``share`` mapping {echo layer: source layer} of an ``attnzoo-echo/1`` file or dict
    ({"format", "share": {layer: source}}), unchecked (:func:`echo_plans` checks the layers)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            source = json.load(f)
    if not isinstance(source, Mapping) or source.get("format") != ECHO_FORMAT or not isinstance(source.get("share"), Mapping):
        got = f"format {source.get('format')!r}" if isinstance(source, Mapping) else type(source).__name__
        raise InvalidArgumentError("config", f'a path or dict {{"format": "{ECHO_FORMAT}", "share": {{layer: source, ...}}}}', got)
    return source["share"]


def roots(share: Mapping[int, int]) -> dict[int, int]:
    """{echo layer: the layer whose own attention it ends up reusing}: an echo of an echo layer
    reuses that layer's source. Each echo layer must come after its source."""
    out = {}
    for layer, source in sorted(share.items()):
        if source >= layer:
            raise InvalidArgumentError(f"share[{layer}]", f"a source layer before layer {layer} (EchoAtt reuses an earlier "
                                       "layer's attention; layer 0 has none)", source)
        out[layer] = out.get(source, source)
    return out


def echo_plans(found: Sequence[AttentionLayer], config: str | os.PathLike | Mapping) -> dict[int, LayerPlan]:
    """{layer: plan}: a :class:`SourcePlan` on each source layer, an :class:`EchoPlan` on each echo
    layer (prefill and decode), nothing on the others."""
    by_index = {layer.index: layer for layer in found}
    share = {layer_index(t, list(by_index), "config.share"): layer_index(s, list(by_index), f"config.share[{t}]")
             for t, s in load_echo_config(config).items()}
    if not share:
        raise InvalidArgumentError("config.share", "at least one {echo layer: source layer} pair", "an empty mapping")
    share = roots(share)
    windowed = sorted(i for i in {*share, *share.values()} if by_index[i].window is not None)
    if windowed:
        raise UnsupportedError(f"echo: layers {windowed} use a sliding window, whose cached steps run the model's own attention")
    maps, echo = SharedMaps(), get_method("echo")  # a source runs echo on its own q, k: exact attention
    plans: dict[int, LayerPlan] = {s: SourcePlan([HeadGroup(None, echo)], True, layer=s, maps=maps) for s in set(share.values())}
    plans.update({t: EchoPlan([HeadGroup(None, echo)], True, layer=t, source=s, maps=maps) for t, s in share.items()})
    return plans


def echo_search(model, ids: torch.Tensor, shared: int, *, metric: str = "cosine") -> dict[str, Any]:
    """An ``attnzoo-echo/1`` config sharing ``shared`` layers, chosen on calibration tokens ``ids`` (1, N).

    EchoAtt's rule, greedily: repeatedly pick the layer whose own attention is most similar
    (:func:`attnzoo.analysis.layer_similarity`, ``metric``) to the attention it would reuse, that of
    the previous layer or, where the previous layer already echoes, that layer's source."""
    from ...analysis import layer_similarity, record

    recording = record(model, ids)
    similarity = layer_similarity(recording.probs, metric=metric)
    layers = recording.layers
    shared = check_int("shared", shared, minimum=1)
    if shared >= len(layers):
        raise InvalidArgumentError("shared", f"fewer than the model's {len(layers)} attention layers", shared)
    share: dict[int, int] = {}
    for _ in range(shared):
        candidates = {}
        for position in range(1, len(layers)):
            if layers[position] in share:
                continue
            source = share.get(layers[position - 1], layers[position - 1])
            candidates[layers[position]] = (float(similarity[position, layers.index(source)]), source)
        chosen = max(candidates, key=lambda layer: candidates[layer][0])
        share[chosen] = candidates[chosen][1]
        for later, source in list(share.items()):  # a layer that echoed `chosen` now reuses chosen's source
            if source == chosen:
                share[later] = share[chosen]
    return {"format": ECHO_FORMAT, "metric": metric, "calibration_tokens": int(ids.shape[-1]),
            "share": {str(t): s for t, s in sorted(share.items())},
            "similarity": {str(t): float(similarity[layers.index(t), layers.index(s)]) for t, s in sorted(share.items())}}
