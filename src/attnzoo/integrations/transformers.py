"""Run attnzoo methods inside Hugging Face transformers models, through transformers' own interfaces.

``patch`` registers one attention function and one mask function under the name ``"attnzoo"``
(``AttentionInterface`` and ``AttentionMaskInterface``: without the mask function the model would
silently receive no causal mask), switches the model's attention implementation to it, and hangs a
per-layer plan on each attention module. The tensors reaching the function are post-RoPE
q (B, Hq, N, D), k and v (B, Hkv, N, D); it returns (B, N, Hq, D). Layers and heads without a plan
run transformers' own SDPA attention, bit for bit what the unpatched model runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("attnzoo.patch needs Hugging Face transformers: pip install 'attnzoo[models]' (or pip install transformers)") from e

from ..errors import InvalidArgumentError, UnsupportedError, check_int
from ..kernels.dense import causal_mask, repeat_kv, sdpa
from ..method import Method
from ..registry import get_method

IMPLEMENTATION = "attnzoo"
PATTERNS_FORMAT = "attnzoo-patterns/1"
_PLAN = "_attnzoo_plan"
_STATE = "_attnzoo_state"

# model_type -> (kind, function returning the per-layer attention modules of the base model)
FAMILIES: dict[str, tuple[str, Callable[[torch.nn.Module], list[torch.nn.Module]]]] = {
    "llama": ("decoder", lambda base: [layer.self_attn for layer in base.layers]),
    "bert": ("encoder", lambda base: [layer.attention.self for layer in base.encoder.layer]),
    "roberta": ("encoder", lambda base: [layer.attention.self for layer in base.encoder.layer]),
}
SUPPORTED = "Llama-family decoders (model_type 'llama', e.g. SmolLM2) and BERT-family encoders (model_type 'bert' or 'roberta', e.g. MiniLM)"


# ---- plans ----------------------------------------------------------------------------------
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
    heads; ``decode``: whether calls with fewer queries than keys (decoding over a cache) run the
    methods (True) or exact attention (False)."""

    groups: list[HeadGroup]
    decode: bool

    def __call__(self, q, k, v, mask, causal: bool, scale: float) -> torch.Tensor | None:
        if q.shape[2] != k.shape[2] and not self.decode:
            return None
        return _masked_run(self._run, q, k, v, mask, causal, scale)

    def _run(self, q, k, v, causal: bool, scale: float) -> torch.Tensor:
        if len(self.groups) == 1 and self.groups[0].heads is None:
            return _call_method(self.groups[0].method, q, k, v, causal, scale)
        out = q.new_empty(*q.shape[:3], v.shape[-1])
        covered: list[int] = []
        for group in self.groups:
            heads = list(group.heads)
            out[:, heads] = _call_method(group.method, *_select_heads(q, k, v, heads), causal, scale)
            covered += heads
        rest = [h for h in range(q.shape[1]) if h not in covered]
        if rest:
            qr, kr, vr = _select_heads(q, k, v, rest)
            out[:, rest] = sdpa(qr, kr, vr, causal=causal, scale=scale)
        return out


@dataclass
class CapturePlan:
    """Records the post-RoPE q, k, v of prefill calls (detached, on the CPU) and lets exact attention run."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, q, k, v, mask, causal: bool, scale: float) -> None:
        if q.shape[2] == k.shape[2]:
            self.records.append({"q": q.detach().cpu(), "k": k.detach().cpu(), "v": v.detach().cpu(),
                                 "causal": causal, "scale": scale, "mask": None if mask is None else mask.detach().cpu()})
        return None


def _call_method(method: Method, q, k, v, causal: bool, scale: float) -> torch.Tensor:
    if q.shape[1] != k.shape[1] and not method.info.gqa:
        k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
    return method(q, k, v, causal=causal, scale=scale)


def _select_heads(q, k, v, heads: list[int]):
    """q on query heads ``heads``; k and v on the key/value heads they read. GQA stays grouped where
    ``heads`` (sorted) is a union of whole groups; otherwise each selected query head gets its own copy."""
    groups = q.shape[1] // k.shape[1]
    kv_of = [h // groups for h in heads]
    kv_heads = sorted(set(kv_of))
    whole = heads == [g * groups + i for g in kv_heads for i in range(groups)]
    kv_index = kv_heads if whole else kv_of
    return q[:, heads], k[:, kv_index], v[:, kv_index]


# ---- padding --------------------------------------------------------------------------------
def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    allowed = mask == 0
    if not bool((allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
        raise UnsupportedError("attnzoo patch: the model passed an additive attention bias; only 0/-inf masks (padding) are supported")
    return allowed


def _masked_run(run, q, k, v, mask, causal: bool, scale: float) -> torch.Tensor:
    """Run ``run`` on each sequence's unpadded span when ``mask`` (B|1, 1, Nq, Nk) marks padding.

    The mask must be the plain causal (or bidirectional) pattern restricted to one contiguous span
    of valid keys per sequence, the form transformers builds from a 2-D padding mask; anything else
    (packed sequences, custom masks) is refused rather than silently ignored. Padded query rows get
    zeros."""
    if mask is None:
        return run(q, k, v, causal, scale)
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise UnsupportedError(f"attnzoo patch: expected a (batch, 1, Nq, Nk) attention mask, got shape {tuple(mask.shape)}")
    B, _, Nq, _ = q.shape
    Nk, off = k.shape[2], k.shape[2] - q.shape[2]
    mask = _bool_mask(mask)[:, 0].expand(B, Nq, Nk)
    pattern = causal_mask(Nq, Nk, q.device) if causal else torch.ones(Nq, Nk, dtype=torch.bool, device=q.device)
    keys = mask.any(dim=1)
    if bool(keys.all()) and bool((mask == pattern).all()):
        return run(q, k, v, causal, scale)
    out = q.new_zeros(*q.shape[:3], v.shape[-1])
    positions = torch.arange(Nk, device=q.device)
    for b in range(B):
        valid = keys[b].nonzero()
        if not len(valid):
            continue
        ks, ke = int(valid[0]), int(valid[-1]) + 1
        qs, qe = max(ks - off, 0), ke - off
        span = (positions >= ks) & (positions < ke)
        expected = pattern[qs:qe] & span
        if qe <= qs or not bool(keys[b, ks:ke].all()) or not torch.equal(mask[b, qs:qe], expected):
            raise UnsupportedError(
                "attnzoo patch: the attention mask is not causal/bidirectional attention over one contiguous span of "
                "unpadded tokens per sequence (packed sequences or custom masks); only padding is supported")
        out[b:b + 1, :, qs:qe] = run(q[b:b + 1, :, qs:qe], k[b:b + 1, :, ks:ke], v[b:b + 1, :, ks:ke], causal, scale)
    return out


# ---- the attention function transformers calls ------------------------------------------------
def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, **kwargs):
    plan = getattr(module, _PLAN, None)
    if plan is not None:
        for name in ("sliding_window", "softcap", "s_aux"):
            if kwargs.get(name) is not None:
                raise UnsupportedError(f"attnzoo patch: the model passes {name}={kwargs[name]!r} to attention, which attnzoo methods do not take")
        if dropout:
            raise UnsupportedError(f"attnzoo patch: attention dropout {dropout} is not supported; call model.eval() or set the dropout to 0")
        causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        out = plan(query, key, value, attention_mask, causal, scale)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


# ---- building plans from user specs -----------------------------------------------------------
def attention_modules(model) -> tuple[str, list[torch.nn.Module]]:
    """("decoder" | "encoder", the self-attention module of each layer) for a supported model."""
    if not isinstance(model, PreTrainedModel):
        raise InvalidArgumentError("model", "a Hugging Face transformers PreTrainedModel", type(model).__name__)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedError(f"attnzoo.patch supports {SUPPORTED}; got model_type {model_type!r} ({type(model).__name__})")
    kind, modules = FAMILIES[model_type]
    return kind, modules(model.base_model)


def _method(spec: Any, config: Mapping[str, Any], where: str, memo: dict[str, Method]) -> Method:
    """The Method for ``spec``; equal specs share one object (in ``memo``), so the layouts it caches
    per shape serve every layer."""
    if isinstance(spec, Method):
        if config:
            raise InvalidArgumentError(where, "options only with a method name (a Method object is already configured)", sorted(config))
        return spec
    key = json.dumps([spec, config], sort_keys=True, default=repr)
    if key not in memo:
        memo[key] = _new_method(spec, config, where)
    return memo[key]


def _new_method(spec: Any, config: Mapping[str, Any], where: str) -> Method:
    if isinstance(spec, str):
        return get_method(spec, **config)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        return get_method(spec[0], **{**config, **spec[1]})
    if isinstance(spec, Mapping) and "method" in spec:
        return get_method(spec["method"], **{**config, **spec.get("config", {})})
    raise InvalidArgumentError(where, "a method name, (name, config dict), a configured Method or None (exact)", repr(spec))


def _layer_index(value: object, num_layers: int, where: str) -> int:
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    index = check_int(where, value, minimum=0)
    if index >= num_layers:
        raise InvalidArgumentError(where, f"a layer index in [0, {num_layers - 1}] (the model has {num_layers} layers)", index)
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


def _auto_groups(entries: object, num_heads: int, where: str, memo: dict[str, Method]) -> list[HeadGroup]:
    """One spec per query head; heads with equal specs run together as one group."""
    if not isinstance(entries, list) or len(entries) != num_heads:
        raise InvalidArgumentError(where, f"a list of {num_heads} method specs (one per query head)", repr(entries)[:200])
    by_spec: dict[str, list[int]] = {}
    for head, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("method"), str):
            raise InvalidArgumentError(f"{where}[{head}]", '{"method": name, "config": {...}}', repr(entry))
        by_spec.setdefault(json.dumps({"method": entry["method"], "config": entry.get("config", {})}, sort_keys=True), []).append(head)
    return [HeadGroup(tuple(heads) if len(heads) < num_heads else None, _method(json.loads(spec), {}, where, memo))
            for spec, heads in by_spec.items()]


def _check_runs(method: Method, kind: str, module, layer: int) -> None:
    info = method.info
    causal = bool(getattr(module, "is_causal", kind == "decoder"))
    if causal and not info.causal:
        raise UnsupportedError(f"method {info.name!r} cannot run causal attention, which layer {layer} of this {kind} needs (it is non-causal only)")
    if not causal and not info.non_causal:
        raise UnsupportedError(f"method {info.name!r} is causal only; layer {layer} of this {kind} attends bidirectionally")


def _plans(model, method, layers, heads, decode, config) -> dict[int, LayerPlan]:
    kind, modules = attention_modules(model)
    num_layers, num_heads = len(modules), model.config.num_attention_heads
    if decode not in ("auto", "exact", "method"):
        raise InvalidArgumentError("decode", "'auto', 'exact' or 'method'", repr(decode))

    if isinstance(method, str) and method == "auto":
        if set(config) != {"config"}:
            raise InvalidArgumentError("config", "patch(model, 'auto', config=PATH_OR_DICT) and no other options", sorted(config))
        if layers is not None or heads is not None:
            raise InvalidArgumentError("layers, heads", "None with 'auto' (the patterns file sets both)", f"layers={layers!r}, heads={heads!r}")
        data, methods = _load_patterns(config["config"]), {}
        groups = {_layer_index(i, num_layers, f"config.layers[{i!r}]"): _auto_groups(e, num_heads, f"config.layers[{i!r}]", methods)
                  for i, e in data["layers"].items()}
    else:
        per_layer = _per_layer_specs(method, layers, num_layers)
        head_set = None if heads is None else _head_list(heads, num_heads, "heads")
        if head_set is not None and len(head_set) == num_heads:
            head_set = None
        methods: dict[str, Method] = {}
        groups = {i: [HeadGroup(head_set, _method(spec, config, f"method for layer {i}", methods))]
                  for i, spec in per_layer.items() if spec is not None}

    plans = {}
    for layer, layer_groups in groups.items():
        for g in layer_groups:
            _check_runs(g.method, kind, modules[layer], layer)
            if decode == "method" and not g.method.info.cross:
                raise UnsupportedError(f"decode='method': method {g.method.info.name!r} has no decode path (it needs Nq == Nk)")
        run_decode = decode == "method" or (decode == "auto" and all(_decode_path(g.method) for g in layer_groups))
        plans[layer] = LayerPlan(layer_groups, run_decode)
    return plans


def _decode_path(method: Method) -> bool:
    """Whether a method defines a decode step: a position pattern (local family: a window keeps its
    shape for the last query) or a decode-time method, able to run Nq < Nk. Content-selected
    methods (MInference, HiP, ...) are prefill methods: their decode steps run exact attention."""
    info = method.info
    return info.cross and ("local" in info.family or "decode" in info.family)


def _per_layer_specs(method, layers, num_layers: int) -> dict[int, Any]:
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
            return {_layer_index(i, num_layers, f"layers[{i!r}]"): spec for i, spec in layers.items()}
        return {i: layers(i) for i in range(num_layers)}
    if method is None:
        raise InvalidArgumentError("method", "a method name, a configured Method, a per-layer dict/callable or 'auto'", None)
    if layers is None:
        return {i: method for i in range(num_layers)}
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise InvalidArgumentError("layers", "None, an iterable of layer indices, a dict {layer: method} or a callable", repr(layers))
    return {_layer_index(i, num_layers, "layers"): method for i in layers}


# ---- public entry points ----------------------------------------------------------------------
class Patch:
    """Handle returned by :func:`patch`; ``with patch(...) as model:`` unpatches on exit."""

    def __init__(self, model, plans: Mapping[int, Any]):
        self.model, self.plans = model, dict(plans)

    def __enter__(self):
        return self.model

    def __exit__(self, *exc) -> None:
        unpatch(self.model)

    def describe(self) -> dict[int, list[dict[str, Any]]]:
        """{layer: [{heads, method}, ...]} for every patched layer (others run exact attention)."""
        return {i: [g.as_dict() for g in p.groups] for i, p in sorted(self.plans.items()) if isinstance(p, LayerPlan)}

    def __repr__(self) -> str:
        return f"Patch({type(self.model).__name__}, layers={sorted(self.plans)})"


def install(model, plans: Mapping[int, Any]) -> Patch:
    """Hang ``plans`` ({layer: plan}) on the model's attention modules and route attention through attnzoo."""
    _, modules = attention_modules(model)
    plans = {_layer_index(i, len(modules), "layers"): plan for i, plan in plans.items()}
    unpatch(model)
    configs = {id(c): c for c in [model.config, *(getattr(m, "config", model.config) for m in modules)]}
    setattr(model, _STATE, [(c, c._attn_implementation_internal) for c in configs.values()])
    for c in configs.values():
        c._attn_implementation_internal = IMPLEMENTATION
    for layer, plan in plans.items():
        setattr(modules[layer], _PLAN, plan)
    return Patch(model, plans)


def patch(model, method=None, *, layers=None, heads=None, decode: str = "auto", **config) -> Patch:
    """Run attention ``method`` inside a transformers ``model``; reversible with :func:`unpatch`.

    ``method``: a registered name (configured by ``**config``), a configured :class:`Method`, or
    ``"auto"`` with ``config=PATH_OR_DICT`` (an ``attnzoo-patterns/1`` file: per layer, one method
    spec per query head; heads with equal specs run together; unlisted layers stay exact).
    ``layers``: None (all), an iterable of layer indices (the others stay exact), or per-layer
    settings as a dict {layer: name | (name, config) | Method | None} or a callable of the layer
    index returning one of those. ``heads``: query-head indices that run the method (the others run
    exact attention; GQA groups are respected). ``decode``: calls with fewer queries than keys
    (decoding over a cache) run the method where it defines a decode step (``"auto"``: position
    patterns and decode-time methods; content-selected prefill methods decode exactly), always
    exact attention (``"exact"``), or the method (``"method"``). Padded batches run each sequence's
    unpadded span. Returns a :class:`Patch`, usable as a context manager.
    """
    return install(model, _plans(model, method, layers, heads, decode, config))


def unpatch(model) -> bool:
    """Restore the model's own attention; True if it was patched."""
    state = getattr(model, _STATE, None)
    if state is None:
        return False
    for c, implementation in state:
        c._attn_implementation_internal = implementation
    for module in model.modules():
        if hasattr(module, _PLAN):
            delattr(module, _PLAN)
    delattr(model, _STATE)
    return True
