"""What each attention layer runs: head groups with their methods, built from the user's specs.

Nothing here imports transformers: plans are built against :class:`AttentionLayer` descriptions
(which the adapter finds in a model) and run on the tensors the model's attention function gets,
q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D), post-RoPE.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ...errors import InvalidArgumentError, UnsupportedError, check_int
from ...kernels.dense import attention_probabilities, causal_mask, repeat_kv, sdpa
from ...method import Call, Method
from ...registry import get_method, method_class
from .padding import masked_run

PATTERNS_FORMAT = "attnzoo-patterns/1"


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of a model: its layer ``index``, whether it attends causally, its
    query / key-value head counts and head size, the scale it passes (None: head_dim ** -0.5) and
    the sliding ``window`` it passes (None: full attention)."""

    index: int
    module: torch.nn.Module = field(repr=False)
    causal: bool
    heads: int
    kv_heads: int
    head_dim: int
    scale: float | None = None
    window: int | None = None


@dataclass(frozen=True)
class TokenLayout:
    """Image tokens: ``num_global`` leading tokens (a ViT's CLS token), then a row-major ``grid``."""

    grid: tuple[int, ...]
    num_global: int

    @property
    def tokens(self) -> int:
        return self.num_global + math.prod(self.grid)


# embeddings parameters holding a vision model's leading tokens, in no particular order (they all lead the
# patch tokens): ViT / DeiT / DINOv2 ``cls_token``, CLIP ``class_embedding``, DeiT ``distillation_token``,
# DINOv2-with-registers ``register_tokens`` (1, R, D)
GLOBAL_TOKEN_PARAMETERS = ("cls_token", "class_embedding", "distillation_token", "register_tokens")


def token_layout(model) -> TokenLayout | None:
    """A vision model's image tokens: its leading tokens (CLS, distillation and register tokens, from
    the embeddings' parameters) then the patch grid ``config.image_size // config.patch_size``;
    None for models without a patch embedding (text models). ViT, DeiT, DINOv2 (with registers),
    CLIP and SigLIP vision towers; an input of another resolution needs ``grid=`` (and ``num_global=``)."""
    config = model.config
    image, patch_size = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    base = model.base_model
    # CLIP/SigLIP vision towers: under .vision_model where the tower is its own base model (transformers 5.2)
    embeddings = getattr(base, "embeddings", None) or getattr(getattr(base, "vision_model", None), "embeddings", None)
    if image is None or patch_size is None or embeddings is None:
        return None
    leading = 0
    for name in GLOBAL_TOKEN_PARAMETERS:
        tokens = getattr(embeddings, name, None)
        if isinstance(tokens, torch.Tensor):
            leading += 1 if tokens.dim() == 1 else tokens.shape[-2]
    pair = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)  # noqa: E731
    return TokenLayout(tuple(i // p for i, p in zip(pair(image), pair(patch_size))), num_global=leading)


# ---- running a plan ---------------------------------------------------------------------------
@dataclass
class HeadGroup:
    """Query heads ``heads`` (None: all of them) run ``method``."""

    heads: tuple[int, ...] | None
    method: Method

    def as_dict(self) -> dict[str, Any]:
        return {"heads": list(self.heads) if self.heads is not None else "all", "method": repr(self.method)}


@dataclass
class LayerPlan:
    """What one attention layer runs: head groups with their methods, exact attention on the other
    heads. ``decode``: whether calls with fewer queries than keys (decoding over a cache) run the
    methods (True) or exact attention (False). ``window``: the sliding window the model's layer
    has (None: full attention); see :meth:`runs`. The first call checks q, k, v for NaN / inf,
    later calls skip that check (no host sync per layer)."""

    groups: list[HeadGroup]
    decode: bool
    window: int | None = None
    finite_checked: bool = field(default=False, repr=False, compare=False)

    def runs(self, len_q: int, len_kv: int, window: int | None = None) -> bool:
        """Whether a call with these lengths runs the methods; otherwise the model's own attention
        does. Decode steps (Nq != Nk) run them only with ``decode``. Where the model passes a sliding
        ``window``, only calls the window cannot restrict run them: Nq == Nk <= window (a prefill
        from an empty cache, no longer than the window). A longer prefill, or any call over a cache
        (which transformers may have cut to the window), runs the model's windowed attention."""
        if window is not None and not len_q == len_kv <= window:
            return False
        return len_q == len_kv or self.decode

    def __call__(self, q, k, v, mask, causal: bool, scale: float, window: int | None = None) -> torch.Tensor | None:
        """(B, Hq, Nq, Dv) output, or None where the model's own attention should run (:meth:`runs`)."""
        if not self.runs(q.shape[2], k.shape[2], window):
            return None
        out = masked_run(partial(self._run, check_finite=not self.finite_checked), q, k, v, mask, causal, scale)
        self.finite_checked = True
        return out

    def probabilities(self, q, k, v, mask, causal: bool, scale: float) -> torch.Tensor:
        """(B, Hq, Nq, Nk) attention probabilities of the methods (:func:`method_probabilities`;
        exact on the heads without a method), float32 (float64 inputs stay float64)."""
        return masked_run(self._probabilities, q, k, v, mask, causal, scale, per_key=True)

    def describe(self) -> list[dict[str, Any]]:
        """[{heads, method}, ...], with ``model_window`` and what runs where the layer is windowed."""
        rows = [g.as_dict() for g in self.groups]
        if self.window is not None:
            note = (f"the method runs while all keys fit the model's sliding window of {self.window} tokens "
                    "(Nq == Nk <= window); longer prefills and cached steps run the model's own windowed attention")
            rows = [{**row, "model_window": self.window, "windowed": note} for row in rows]
        return rows

    def _run(self, q, k, v, causal: bool, scale: float, check_finite: bool) -> torch.Tensor:
        return self._by_group(q, k, v,
                              lambda m, *t: call_method(m, *t, causal=causal, scale=scale, check_finite=check_finite),
                              lambda *t: sdpa(*t, causal=causal, scale=scale))

    def _probabilities(self, q, k, v, causal: bool, scale: float) -> torch.Tensor:
        exact = lambda q, k, v: attention_probabilities(q, k, scale=scale, mask=causal_mask(q.shape[2], k.shape[2], q.device) if causal else None)  # noqa: E731
        return self._by_group(q, k, v, lambda m, *t: method_probabilities(m, *t, causal=causal, scale=scale), exact)

    def _by_group(self, q, k, v, with_method: Callable, exact: Callable) -> torch.Tensor:
        """Per head: ``with_method(method, q, k, v)`` on each group's heads, ``exact(q, k, v)`` on the rest."""
        if len(self.groups) == 1 and self.groups[0].heads is None:
            return with_method(self.groups[0].method, q, k, v)
        out, covered = None, []
        for group in self.groups:
            heads = list(group.heads)
            part = with_method(group.method, *select_heads(q, k, v, heads))
            if out is None:
                out = part.new_empty(*q.shape[:3], part.shape[-1])
            out[:, heads] = part
            covered += heads
        rest = [h for h in range(q.shape[1]) if h not in covered]
        if rest:
            out[:, rest] = exact(*select_heads(q, k, v, rest))
        return out


def _kv_for(method: Method, q, k, v):
    """k and v with the key/value heads repeated per query head where ``method`` takes no GQA."""
    if q.shape[1] != k.shape[1] and not method.info.gqa:
        return repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
    return k, v


def call_method(method: Method, q, k, v, *, causal: bool, scale: float, check_finite: bool = True) -> torch.Tensor:
    """``method`` on q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D) -> (B, Hq, Nq, Dv)."""
    return method(q, *_kv_for(method, q, k, v), causal=causal, scale=scale, check_finite=check_finite)


def method_probabilities(method: Method, q, k, v, *, causal: bool, scale: float) -> torch.Tensor:
    """(B, Hq, Nq, Nk) attention probabilities of ``method``: the exact softmax restricted to its
    ``.support`` (the pairs it attends to). That is what sparse-softmax methods (position patterns,
    block selections, dense) compute; ``hyper`` also weights its sampled entries, which this leaves
    out. Methods without a support (linear or pooled attention) raise :class:`UnsupportedError`."""
    support = method.support(q, *_kv_for(method, q, k, v), causal=causal, scale=scale)
    if support is None:
        raise UnsupportedError(f"attention probabilities: method {method.info.name!r} has no sparse support (linear or pooled "
                               "attention is not a softmax over chosen keys); capture it with probs=False")
    if causal:
        support = support & causal_mask(q.shape[2], k.shape[2], q.device)
    return attention_probabilities(q, k, scale=scale, mask=support)


def _kv_index(heads: Sequence[int], groups: int) -> list[int]:
    """Key/value heads for query heads ``heads`` (sorted): GQA stays grouped where ``heads`` is a
    union of whole groups of ``groups`` query heads; otherwise one key/value head per query head."""
    kv_of = [h // groups for h in heads]
    kv_heads = sorted(set(kv_of))
    whole = list(heads) == [g * groups + i for g in kv_heads for i in range(groups)]
    return kv_heads if whole else kv_of


def select_heads(q, k, v, heads: list[int]):
    """q on query heads ``heads``; k and v on the key/value heads they read (:func:`_kv_index`)."""
    kv = _kv_index(heads, q.shape[1] // k.shape[1])
    return q[:, heads], k[:, kv], v[:, kv]


# ---- building plans from user specs -------------------------------------------------------------
def layer_index(value: object, indices: Sequence[int], where: str) -> int:
    """``value`` (an int or a digit string) checked against the model's attention-layer ``indices``."""
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    index = check_int(where, value, minimum=0)
    if index not in indices:
        n = len(indices)
        expected = (f"a layer index in [0, {n - 1}] (the model has {n} layers)" if list(indices) == list(range(n))
                    else f"one of the model's attention-layer indices {sorted(indices)}")
        raise InvalidArgumentError(where, expected, index)
    return index


def _head_list(heads: Iterable[int], num_heads: int, where: str) -> tuple[int, ...]:
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
        raise InvalidArgumentError(where, "an iterable of query-head indices", repr(heads))
    out = []
    for h in heads:
        h = check_int(where, h, minimum=0)
        if h >= num_heads:
            raise InvalidArgumentError(where, f"query-head indices in [0, {num_heads - 1}] (the model has {num_heads} query heads)", h)
        out.append(h)
    if not out or len(set(out)) != len(out):
        raise InvalidArgumentError(where, "a non-empty list of distinct query-head indices", out)
    return tuple(sorted(out))


class _Methods:
    """Methods from specs; equal specs share one object, so the layouts it caches per shape serve
    every layer. Spatial methods named without ``grid=`` get the model's image-token layout."""

    def __init__(self, tokens: TokenLayout | None):
        self.tokens, self.memo = tokens, {}

    def get(self, spec: Any, config: Mapping[str, Any], where: str) -> Method:
        if isinstance(spec, Method):
            if config:
                raise InvalidArgumentError(where, "options only with a method name (a Method object is already configured)", sorted(config))
            return spec
        key = json.dumps([spec, config], sort_keys=True, default=repr)
        if key not in self.memo:
            name, options = self._name_and_options(spec, config, where)
            self.memo[key] = get_method(name, **self._with_layout(name, options))
        return self.memo[key]

    @staticmethod
    def _name_and_options(spec: Any, config: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
        if isinstance(spec, str):
            return spec, dict(config)
        if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
            return spec[0], {**config, **spec[1]}
        if isinstance(spec, Mapping) and "method" in spec:
            return spec["method"], {**config, **spec.get("config", {})}
        raise InvalidArgumentError(where, "a method name, (name, config dict), a configured Method or None (exact)", repr(spec))

    def _with_layout(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        cls = method_class(name)
        if self.tokens is None or not cls.info.spatial or "grid" in options:
            return options
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        if self.tokens.num_global and "num_global" not in fields:
            raise UnsupportedError(f"method {name!r} takes no global tokens (no num_global option), so it cannot lay out this model's "
                                   f"{self.tokens.num_global} leading token(s) before its {self.tokens.grid} grid of image tokens")
        layout = {"grid": self.tokens.grid, "num_global": self.tokens.num_global} if "num_global" in fields else {"grid": self.tokens.grid}
        return {**layout, **options}


def _load_patterns(source: str | os.PathLike | Mapping) -> Mapping:
    if isinstance(source, Mapping):
        data = source
    elif isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            data = json.load(f)
    else:
        raise InvalidArgumentError("config", f"a path to an {PATTERNS_FORMAT} JSON file or its dict", type(source).__name__)
    if data.get("format") != PATTERNS_FORMAT or not isinstance(data.get("layers"), Mapping):
        raise InvalidArgumentError("config", f'{{"format": "{PATTERNS_FORMAT}", "layers": {{...}}}}', f"format {data.get('format')!r}")
    return data


def _auto_groups(entries: object, num_heads: int, where: str, methods: _Methods) -> list[HeadGroup]:
    """One spec per query head; heads with equal specs run together as one group."""
    if not isinstance(entries, list) or len(entries) != num_heads:
        raise InvalidArgumentError(where, f"a list of {num_heads} method specs (one per query head)", repr(entries)[:200])
    by_spec: dict[str, list[int]] = {}
    for head, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("method"), str):
            raise InvalidArgumentError(f"{where}[{head}]", '{"method": name, "config": {...}}', repr(entry))
        by_spec.setdefault(json.dumps({"method": entry["method"], "config": entry.get("config", {})}, sort_keys=True), []).append(head)
    return [HeadGroup(tuple(heads) if len(heads) < num_heads else None, methods.get(json.loads(spec), {}, where))
            for spec, heads in by_spec.items()]


def _per_layer_specs(method, layers, indices: Sequence[int]) -> dict[int, Any]:
    """{layer: spec or None} from ``method`` and ``layers`` (a list, a dict or a callable)."""
    per_layer_given = isinstance(layers, Mapping) or callable(layers)
    if isinstance(method, Mapping) or (callable(method) and not isinstance(method, Method)):
        if layers is not None:
            raise InvalidArgumentError("layers", "None when method is a per-layer dict or callable", repr(layers))
        method, layers, per_layer_given = None, method, True
    if per_layer_given:
        if method is not None:
            raise InvalidArgumentError("method", "None when layers gives per-layer methods (a dict or callable)", repr(method))
        if isinstance(layers, Mapping):
            return {layer_index(i, indices, f"layers[{i!r}]"): spec for i, spec in layers.items()}
        return {i: layers(i) for i in indices}
    if method is None:
        raise InvalidArgumentError("method", "a method name, a configured Method, a per-layer dict/callable or 'auto'", None)
    if layers is None:
        return {i: method for i in indices}
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise InvalidArgumentError("layers", "None, an iterable of layer indices, a dict {layer: method} or a callable", repr(layers))
    return {layer_index(i, indices, "layers"): method for i in layers}


def _check_runs(method: Method, layer: AttentionLayer) -> None:
    info = method.info
    if layer.causal and not info.causal:
        raise UnsupportedError(f"method {info.name!r} cannot run causal attention, which layer {layer.index} needs (it is non-causal only)")
    if not layer.causal and not info.non_causal:
        raise UnsupportedError(f"method {info.name!r} is causal only; layer {layer.index} attends bidirectionally")


def _check_tokens(group: HeadGroup, layer: AttentionLayer, tokens: TokenLayout) -> None:
    """Let the method reject, at patch time, the call every forward of an image model makes."""
    method, heads = group.method, group.heads or tuple(range(layer.heads))
    kv_heads = len(_kv_index(heads, layer.heads // layer.kv_heads)) if method.info.gqa else len(heads)
    scale = layer.scale if layer.scale is not None else layer.head_dim ** -0.5
    method.check(Call(1, len(heads), kv_heads, tokens.tokens, tokens.tokens, layer.head_dim, layer.head_dim,
                      layer.causal, scale, torch.device("cpu"), torch.float32))


def _decode_path(method: Method) -> bool:
    """Whether a method defines a decode step: a position pattern (local family: a window keeps its
    shape for the last query) or a decode-time method, able to run Nq < Nk. Content-selected
    methods (MInference, HiP, ...) are prefill methods: their decode steps run exact attention."""
    info = method.info
    return info.cross and ("local" in info.family or "decode" in info.family)


def build_plans(found: Sequence[AttentionLayer], method, layers, heads, decode: str, config: Mapping[str, Any],
                tokens: TokenLayout | None = None) -> dict[int, LayerPlan]:
    """{layer index: LayerPlan} for the arguments of :func:`~attnzoo.integrations.transformers.patch`
    on the model's attention layers ``found``; ``tokens``: the image-token layout, if any."""
    by_index = {layer.index: layer for layer in found}
    indices = list(by_index)
    if decode not in ("auto", "exact", "method"):
        raise InvalidArgumentError("decode", "'auto', 'exact' or 'method'", repr(decode))
    methods = _Methods(tokens)
    if isinstance(method, str) and method == "auto":
        if set(config) != {"config"}:
            raise InvalidArgumentError("config", "patch(model, 'auto', config=PATH_OR_DICT) and no other options", sorted(config))
        if layers is not None or heads is not None:
            raise InvalidArgumentError("layers, heads", "None with 'auto' (the patterns file sets both)", f"layers={layers!r}, heads={heads!r}")
        groups = {}
        for i, entries in _load_patterns(config["config"])["layers"].items():
            where = f"config.layers[{i!r}]"
            index = layer_index(i, indices, where)
            groups[index] = _auto_groups(entries, by_index[index].heads, where, methods)
    else:
        groups = {}
        for i, spec in _per_layer_specs(method, layers, indices).items():
            if spec is None:
                continue
            head_set = None if heads is None else _head_list(heads, by_index[i].heads, "heads")
            if head_set is not None and len(head_set) == by_index[i].heads:
                head_set = None
            groups[i] = [HeadGroup(head_set, methods.get(spec, config, f"method for layer {i}"))]

    plans = {}
    for index, layer_groups in groups.items():
        layer = by_index[index]
        for g in layer_groups:
            _check_runs(g.method, layer)
            if tokens is not None:
                _check_tokens(g, layer, tokens)
            if decode == "method" and not g.method.info.cross:
                raise UnsupportedError(f"decode='method': method {g.method.info.name!r} has no decode path (it needs Nq == Nk)")
        run_decode = decode == "method" or (decode == "auto" and all(_decode_path(g.method) for g in layer_groups))
        plans[index] = LayerPlan(layer_groups, run_decode, window=layer.window)
    return plans
