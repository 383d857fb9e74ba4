"""Find a transformers model's attention modules and route their attention through attnzoo.

``patch`` registers one attention function and one mask function under the name ``"attnzoo"``
(``AttentionInterface`` and ``AttentionMaskInterface``: without the mask function the model would
silently receive no causal mask), switches the model to it with the public
``model.set_attn_implementation`` (restored on :func:`unpatch`) and hangs a :class:`LayerPlan` on
each patched attention module. Layers and calls without a plan run transformers' own SDPA
attention, bit for bit what an SDPA model runs.

Discovery: an attention module is a submodule whose class's ``forward`` looks transformers'
attention function up in ``ALL_ATTENTION_FUNCTIONS`` under ``config._attn_implementation`` (what
``set_attn_implementation`` switches; transformers' own test for switchable classes reads the same
source), minus cross-attention modules. Its layer index is ``module.layer_idx`` where every module
has a distinct one, else the order of the modules; causality is ``module.is_causal``; heads, key /
value heads and head size come from the module, else its config.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch

try:
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("attnzoo.patch needs Hugging Face transformers: pip install 'attnzoo[models]' (or pip install transformers)") from e

from ...errors import InvalidArgumentError, UnsupportedError
from ...registry import method_class
from .plan import AttentionLayer, LayerPlan, build_plans, layer_index, token_layout

IMPLEMENTATION = "attnzoo"
PLAN_ATTR = "_attnzoo_plan"
CAPTURE_ATTR = "_attnzoo_capture"
_STATE = "_attnzoo_state"
# keywords transformers passes to attention functions that do not change what attention computes (besides
# flags, bool values, which never do); any other keyword with a value (softcap, s_aux attention sinks,
# cu_seq_lens_* of packed sequences, ...) is refused in a patched layer
_NEUTRAL_KWARGS = frozenset({"position_ids", "cache_position", "num_items_in_batch", "encoder_hidden_states", "sliding_window"})


# ---- discovery --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _calls_interface(cls: type) -> bool:
    """Whether ``cls.forward`` looks its attention up in transformers' ``ALL_ATTENTION_FUNCTIONS``."""
    try:
        source = inspect.getsource(inspect.unwrap(cls.forward))
    except (OSError, TypeError, AttributeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source and "_attn_implementation" in source


def _is_cross_attention(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) or "CrossAttention" in type(module).__name__


def _first(objects, names: tuple[str, ...]):
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _describe_layer(index: int, module: torch.nn.Module, model_config) -> AttentionLayer:
    config = getattr(module, "config", model_config)
    heads = _first((module, config), ("num_heads", "num_attention_heads"))
    groups = _first((module,), ("num_key_value_groups",))
    kv_heads = _first((module, config), ("num_key_value_heads",)) or (heads // groups if groups else heads)
    head_dim = _first((module, config), ("head_dim", "attention_head_size")) or config.hidden_size // heads
    window = getattr(module, "sliding_window", getattr(config, "sliding_window", None))
    scale = getattr(module, "scaling", None)
    return AttentionLayer(index, module, bool(getattr(module, "is_causal", True)), heads, kv_heads, head_dim,
                          float(scale) if isinstance(scale, (int, float)) else None, window if isinstance(window, int) else None)


def attention_modules(model) -> list[AttentionLayer]:
    """The self-attention layers of a transformers ``model``, in layer order (see the module docstring)."""
    if not isinstance(model, PreTrainedModel):
        raise InvalidArgumentError("model", "a Hugging Face transformers PreTrainedModel", type(model).__name__)
    named = list(model.named_modules())
    found = [(name, m) for name, m in named if _calls_interface(type(m)) and not _is_cross_attention(m)]
    model_type = getattr(model.config, "model_type", None)
    if not found:
        raise UnsupportedError(f"attnzoo.patch: {type(model).__name__} (model_type {model_type!r}) has no attention module that calls "
                               "transformers' attention interface (ALL_ATTENTION_FUNCTIONS[config._attn_implementation]): its "
                               "attention is written inline, so attnzoo cannot replace it")
    # attention pooling heads (SigLIP's: one learned probe query over the patch tokens, cross-attention) stay as they are
    names = [name for name, _ in found] + [name for name, m in named if "PoolingHead" in type(m).__name__]
    inline = sorted({type(m).__name__ for name, m in named if "Attention" in type(m).__name__ and not _calls_interface(type(m))
                     and not any(name == n or n.startswith(f"{name}.") or name.startswith(f"{n}.") for n in names)})
    if inline:
        raise UnsupportedError(f"attnzoo.patch: {type(model).__name__} (model_type {model_type!r}) also has attention modules that do not "
                               f"call transformers' attention interface ({', '.join(inline)}); patching only the others would leave "
                               "them silently exact")
    modules = [m for _, m in found]
    ids = [getattr(m, "layer_idx", None) for m in modules]
    if all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids):
        order = sorted(zip(ids, modules), key=lambda pair: pair[0])
    else:
        order = list(enumerate(modules))
    return [_describe_layer(i, m, model.config) for i, m in order]


# ---- the attention function transformers calls ------------------------------------------------
def _shown(value: object) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


def _check_call(dropout: float, kwargs: Mapping[str, Any]) -> None:
    for name, value in kwargs.items():
        if value is not None and not isinstance(value, bool) and name not in _NEUTRAL_KWARGS:
            raise UnsupportedError(f"attnzoo patch: the model passes {name}={_shown(value)} to attention, which attnzoo methods do not take")
    if dropout:
        raise UnsupportedError(f"attnzoo patch: attention dropout {dropout} is not supported; call model.eval() or set the dropout to 0")


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, **kwargs):
    plan = getattr(module, PLAN_ATTR, None)
    recorder = getattr(module, CAPTURE_ATTR, None)
    if plan is not None or recorder is not None:
        causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        window = kwargs.get("sliding_window")
        runs = plan is not None and plan.runs(query.shape[2], key.shape[2], window)
        if runs:
            _check_call(dropout, kwargs)
        if recorder is not None:  # a recorder may attend itself (a compressed cache layer): its (B, Hq, Nq, Dv) output wins
            out = recorder(query, key, value, attention_mask, causal, scale, plan if runs else None)
            if out is not None:
                _check_call(dropout, {})
                return out.transpose(1, 2).contiguous(), None
        if runs:
            return plan(query, key, value, attention_mask, causal, scale, window).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


# ---- public entry points ----------------------------------------------------------------------
class Patch:
    """Handle returned by :func:`patch`; ``with patch(...) as model:`` unpatches on exit."""

    def __init__(self, model, plans: Mapping[int, LayerPlan], layers: list[AttentionLayer]):
        self.model, self.plans, self.layers = model, dict(plans), layers

    def __enter__(self):
        return self.model

    def __exit__(self, *exc) -> None:
        unpatch(self.model)

    def describe(self) -> dict[int, list[dict[str, Any]]]:
        """{layer: [{heads, method}, ...]} for every patched layer (others run exact attention);
        windowed layers add ``model_window`` and what runs beyond it (:meth:`LayerPlan.runs`)."""
        return {i: p.describe() for i, p in sorted(self.plans.items())}

    def __repr__(self) -> str:
        return f"Patch({type(self.model).__name__}, layers={sorted(self.plans)})"


def current_patch(model) -> Patch | None:
    """The :class:`Patch` installed on ``model``, or None."""
    state = getattr(model, _STATE, None)
    return None if state is None else state[1]


def install(model, plans: Mapping[int, LayerPlan]) -> Patch:
    """Hang ``plans`` ({layer: plan}) on the model's attention modules and switch the model's
    attention implementation to attnzoo (``model.set_attn_implementation``)."""
    layers = attention_modules(model)
    by_index = {layer.index: layer for layer in layers}
    plans = {layer_index(i, list(by_index), "layers"): plan for i, plan in plans.items()}
    unpatch(model)
    previous = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    stuck = sorted({type(layer.module).__name__ for layer in layers 
                    if getattr(layer.module, "config", model.config)._attn_implementation != IMPLEMENTATION})
    if stuck:
        model.set_attn_implementation(previous)
        raise UnsupportedError(f"attnzoo.patch: {type(model).__name__}.set_attn_implementation did not switch {', '.join(stuck)} "
                               "(transformers judges the class unable to change its attention implementation)")
    for index, plan in plans.items():
        setattr(by_index[index].module, PLAN_ATTR, plan)
    handle = Patch(model, plans, layers)
    setattr(model, _STATE, (previous, handle))
    return handle


def patch(model, method=None, *, layers=None, heads=None, decode: str = "auto", weights=None, **config) -> Patch:
    """Run attention ``method`` inside a transformers ``model``; reversible with :func:`unpatch`.

    ``method``: a registered name (configured by ``**config``), a configured :class:`Method`, or
    ``"auto"`` with ``config=PATH_OR_DICT`` (an ``attnzoo-patterns/1`` file: per layer, one method
    spec per query head; heads with equal specs run together; unlisted layers stay exact), or a
    calibrated method (``"act"``, ``"echo"``) with ``config=`` the file or dict its search wrote.
    ``layers``: None (all), an iterable of layer indices (the others stay exact), or per-layer
    settings as a dict {layer: name | (name, config) | Method | None} or a callable of the layer
    index returning one of those. ``heads``: query-head indices that run the method (the others run
    exact attention; GQA groups are respected). ``decode``: calls with fewer queries than keys
    (decoding over a cache) run the method where it defines a decode step (``"auto"``: position
    patterns and decode-time methods; content-selected prefill methods decode exactly), always
    exact attention (``"exact"``), or the method (``"method"``). Padded batches run each sequence's
    unpadded span. Layers with a sliding window run the method only where the window restricts
    nothing (:meth:`LayerPlan.runs`). On a vision model (ViT, DeiT, DINOv2, CLIP, SigLIP), spatial
    methods named without ``grid=`` get the patch grid and the leading CLS / distillation / register
    tokens as ``num_global`` (:func:`~attnzoo.integrations.transformers.plan.token_layout`). Returns a
    :class:`Patch`, usable as a context manager. ``weights``: a folder written by ``attnzoo distill``
    for ``method``: its trained layers run with their learned state (``config`` overrides inference
    options; no ``layers``).
    """
    found = attention_modules(model)
    from_config = isinstance(method, str) and method != "auto" and "config" in config and method_class(method)
    if from_config and hasattr(from_config, "patch_plans"):  # a calibrated method's config file (act, echo)
        if layers is not None or heads is not None or set(config) != {"config"}:
            raise InvalidArgumentError("config", f"patch(model, {method!r}, config=...) and nothing else (the file names layers "
                                       "and heads)", f"layers={layers!r}, heads={heads!r}, options {sorted(config)}")
        return install(model, from_config.patch_plans(found, config["config"]))
    if weights is not None:
        from ...distill.checkpoint import trained_methods

        if layers is not None:
            raise InvalidArgumentError("layers", "None with weights= (the checkpoint names its layers)", repr(layers))
        shapes = {a.index: (a.heads, a.kv_heads, a.head_dim, a.head_dim) for a in found}
        device = next(model.parameters()).device
        trained = trained_methods(weights, method, config, shapes)
        method, layers, config = None, {i: m.to(device) for i, m in trained.items()}, {}
    return install(model, build_plans(found, method, layers, heads, decode, config, token_layout(model)))


def unpatch(model) -> bool:
    """Restore the model's own attention implementation; True if it was patched."""
    state = getattr(model, _STATE, None)
    if state is None:
        return False
    previous, handle = state
    model.set_attn_implementation(previous)
    for layer in handle.layers:
        if hasattr(layer.module, PLAN_ATTR):
            delattr(layer.module, PLAN_ATTR)
    delattr(model, _STATE)
    return True
