"""MoA's elastic per-head spans as a cache policy: each KV head keeps the sinks and its own span of recent keys."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgumentError, check_int
from ..registry import ComponentInfo
from . import register
from .moa_search import PATTERNS_FORMAT
from .streaming_llm import StreamingLLM


@dataclass
class MoACacheConfig:
    """``config``: an ``attnzoo-patterns/1`` file or dict written by
    :func:`~attnzoo.cache.moa_search.moa_search` (per layer, one ``moa`` spec per query head); or
    ``alpha`` and ``beta``: one rule for every layer, a number or one per KV head. ``sinks``: the
    leading tokens every head keeps (None: the config's, else 64)."""

    config: str | os.PathLike | Mapping[str, Any] | None = None
    alpha: float | Sequence[float] | None = None
    beta: float | Sequence[float] | None = None
    sinks: int | None = None

    def __post_init__(self):
        if (self.config is None) == (self.alpha is None or self.beta is None):
            raise InvalidArgumentError("config", "either a patterns config or both alpha and beta",
                                       f"config={self.config!r}, alpha={self.alpha!r}, beta={self.beta!r}")
        self.layers: dict[int, list[tuple[float, float]]] = {}  # per layer, one (alpha, beta) per query head
        sinks = []
        if self.config is not None:
            found = self.config if isinstance(self.config, Mapping) else _read(self.config)
            if found.get("format") != PATTERNS_FORMAT or not isinstance(found.get("layers"), Mapping):
                raise InvalidArgumentError("config", f"an {PATTERNS_FORMAT!r} config with its 'layers'", repr(found.get("format")))
            for layer, specs in found["layers"].items():
                self.layers[int(layer)], sink = _rules(f"config layers[{layer}]", specs)
                sinks.append(sink)
        else:
            self.alpha, self.beta = _numbers("alpha", self.alpha), _numbers("beta", self.beta)
            if len(self.alpha) == 1 or len(self.beta) == 1:  # one value serves every head
                heads = max(len(self.alpha), len(self.beta))
                self.alpha, self.beta = self.alpha * (heads // len(self.alpha)), self.beta * (heads // len(self.beta))
            if len(self.alpha) != len(self.beta):
                raise InvalidArgumentError("beta", f"{len(self.alpha)} values (as many as alpha)", len(self.beta))
        if self.sinks is None:
            self.sinks = max(sinks, default=64)
        self.sinks = check_int("sinks", self.sinks, minimum=0)


def _read(path) -> Mapping[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidArgumentError("config", "a readable attnzoo-patterns/1 JSON file", f"{path}: {e}") from e


def _numbers(name: str, value) -> tuple[float, ...]:
    values = (value,) if isinstance(value, (int, float)) else tuple(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
        raise InvalidArgumentError(name, "a number >= 0 or a list of them (one per KV head)", repr(value))
    return tuple(float(v) for v in values)


def _rules(where: str, specs) -> tuple[list[tuple[float, float]], int]:
    """The (alpha, beta) of each query head and the sinks of one layer's moa specs (one per query
    head, as moa_search writes them: each spec lists every head's rule)."""
    if not isinstance(specs, Sequence) or not specs:
        raise InvalidArgumentError(where, "a list of moa specs, one per query head", repr(specs))
    rules, sinks = [], set()
    for head, spec in enumerate(specs):
        config = spec.get("config", {}) if isinstance(spec, Mapping) else {}
        if not isinstance(spec, Mapping) or spec.get("method") != "moa" or "alpha" not in config or "beta" not in config:
            raise InvalidArgumentError(f"{where}[{head}]", "a moa spec with the elastic rule (config alpha, beta)", repr(spec))
        rules.append((float(config["alpha"][head]), float(config["beta"][head])))
        sinks.add(int(config.get("sinks", 64)))
    return rules, max(sinks)


@register
class MoACache(StreamingLLM):
    """MoA's elastic spans at decode ("MoA: Mixture of Sparse Attention for Automatic Large
    Language Model Compression", arXiv 2406.14909, section 3: head h attends to the first
    ``sinks`` tokens and its span of alpha_h + beta_h N latest tokens, N the sequence length).

    As a cache policy: KV head h keeps sinks + span_h keys, the sinks and its latest span (ragged:
    every head its own length); a KV head serving several query heads keeps the widest span of its
    group (search with ``moa_search(..., kv_groups=True)`` to give a group one rule). Scoring is
    StreamingLLM's (the sinks, then recency); the budgets come from the rules at the current
    length, so ``compress`` takes no ratio or budget. Prefill attention stays dense; patch the
    model with ``attnzoo.patch(model, "auto", config=...)`` for MoA's prefill too."""

    info = ComponentInfo(name="moa_cache", title="MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression",
                         arxiv="2406.14909", family=("decode",), summary="MoA's per-head elastic spans (alpha + beta N) with sinks, ragged")
    Config = MoACacheConfig
    sets_budget = True

    def head_budgets(self, layer: int, kv_heads: int, real_tokens: int) -> list[int]:
        config = self.config
        if config.config is None:
            rules = list(zip(config.alpha, config.beta))
            rules = rules * kv_heads if len(rules) == 1 else rules
            if len(rules) != kv_heads:
                raise InvalidArgumentError("alpha, beta", f"one value or {kv_heads} (one per KV head)", len(rules))
            groups = [[rule] for rule in rules]
        else:
            if layer not in config.layers:
                raise InvalidArgumentError("config", f"rules for layer {layer} (the config has layers {sorted(config.layers)})", None)
            rules = config.layers[layer]
            if len(rules) % kv_heads:
                raise InvalidArgumentError(f"config layers[{layer}]", f"a multiple of the layer's {kv_heads} KV heads", len(rules))
            size = len(rules) // kv_heads
            groups = [rules[h * size:(h + 1) * size] for h in range(kv_heads)]
        spans = [max(min(real_tokens, max(1, round(a + b * real_tokens))) for a, b in group) for group in groups]
        return [max(1, min(real_tokens, config.sinks + span)) for span in spans]
