"""Patch models built from :class:`attnzoo.nn.Attention`: every chosen layer's method is swapped, reversibly.

    with attnzoo.patch(model, "neighborhood", grid=model.grid, kernel_size=5):
        logits = model(images)
    attnzoo.patch(model, "sparsifiner", weights="out/")   # learned state from an ``attnzoo distill`` checkpoint

Layers are the model's ``attnzoo.nn.Attention`` submodules in ``model.modules()`` order, indexed from 0. A
method named by string is built once per layer (learned methods keep per-layer state) and materialised for
the layer's shapes on its device and dtype; a configured ``Method`` object is used as it is in every layer.
Checkpoints of recipes that train whole attention layers (``clear``) replace the layers with trained copies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from copy import deepcopy
from typing import Any

import torch

from ..errors import InvalidArgumentError, UnsupportedError
from ..method import Method
from ..nn import Attention
from ..registry import as_method

_STATE = "_attnzoo_nn_patch"


def attention_layers(model: torch.nn.Module) -> list[Attention]:
    """The ``attnzoo.nn.Attention`` submodules of ``model``, in ``model.modules()`` order."""
    return [m for m in model.modules() if isinstance(m, Attention)]


def is_attnzoo_model(model: object) -> bool:
    """Whether ``model`` is an ``nn.Module`` holding at least one ``attnzoo.nn.Attention``."""
    return isinstance(model, torch.nn.Module) and bool(attention_layers(model))


class NNPatch:
    """Handle returned by :func:`patch`: ``methods`` {layer: Method, or the Attention that replaced the
    layer}; ``with`` unpatches on exit."""

    def __init__(self, model: torch.nn.Module, methods: dict[int, Method], originals: dict[int, Method]):
        self.model, self.methods, self.originals = model, methods, originals

    def __enter__(self) -> torch.nn.Module:
        return self.model

    def __exit__(self, *exc) -> None:
        unpatch(self.model)

    def describe(self) -> dict[int, str]:
        return {i: repr(m) for i, m in sorted(self.methods.items())}

    def __repr__(self) -> str:
        return f"NNPatch({type(self.model).__name__}, layers={sorted(self.methods)})"


def fitted(method: Method, layer: Attention) -> Method:
    """``method`` materialised for ``layer``'s shapes, on its parameters' device and dtype."""
    method.materialize(layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.head_dim)
    weight = layer.q_proj.weight
    return method.to(device=weight.device, dtype=weight.dtype)


def _chosen(layers: Iterable[int] | None, count: int) -> list[int]:
    if layers is None:
        return list(range(count))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise InvalidArgumentError("layers", "None or an iterable of attention-layer indices", repr(layers))
    chosen = list(layers)
    bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count]
    if bad or not chosen:
        raise InvalidArgumentError("layers", f"a non-empty list of indices in [0, {count - 1}] (the model has {count} attention layers)",
                                   chosen)
    return chosen


def attention_copy(layer: Attention, method: str, config: Mapping[str, Any]) -> Attention:
    """A trainable copy of ``layer`` (its own projections) running ``method`` (CLEAR-style recipes train these)."""
    copy = deepcopy(layer)
    copy.method = fitted(as_method(method, **config), copy)
    return copy.requires_grad_(True)


def _swap(model: torch.nn.Module, index: int, unit: Method | Attention) -> Method | Attention:
    """Put ``unit`` into attention layer ``index``: a Method becomes its method, an Attention replaces
    the layer itself (in its parent module). Returns what it replaced."""
    layer = attention_layers(model)[index]
    if isinstance(unit, Method):
        previous, layer.method = layer.method, unit
        return previous
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is layer:
                setattr(parent, name, unit)
                return layer
    raise InvalidArgumentError("model", "attention layers held by a parent module", "the model itself is one")  # pragma: no cover


def install(model: torch.nn.Module, units: Mapping[int, Method | Attention]) -> NNPatch:
    """Put ``units`` ({layer index: a fitted Method, or an Attention that replaces the layer}) into the model."""
    unpatch(model)
    originals = {index: _swap(model, index, unit) for index, unit in units.items()}
    handle = NNPatch(model, dict(units), originals)
    setattr(model, _STATE, handle)
    return handle


def patch(model: torch.nn.Module, method: str | Method | None = None, *, layers: Iterable[int] | None = None,
          weights: Any = None, **config: Any) -> NNPatch:
    """Run ``method`` (configured by ``config``) in the ``attnzoo.nn.Attention`` layers of ``model``
    (``layers``: indices, default all); ``weights``: a folder written by ``attnzoo distill`` for this
    method, whose trained layers (and their learned state) replace ``layers``. Returns an :class:`NNPatch`."""
    found = attention_layers(model)
    if not found:
        raise UnsupportedError(f"attnzoo.patch: {type(model).__name__} has no attnzoo.nn.Attention layer")
    if method is None:
        raise InvalidArgumentError("method", "a registered method name or a configured attnzoo.Method", None)
    if weights is not None:
        from ..distill.checkpoint import trained_units

        if layers is not None:
            raise InvalidArgumentError("layers", "None with weights= (the checkpoint names its layers)", repr(layers))
        weight = found[0].q_proj.weight
        units = trained_units(weights, method, config, found)
        return install(model, {i: u.to(device=weight.device, dtype=weight.dtype) for i, u in units.items()})
    if isinstance(method, Method) and config:
        raise InvalidArgumentError("config", "no method options with a configured Method", sorted(config))
    methods = {i: fitted(as_method(method, **config), found[i]) for i in _chosen(layers, len(found))}
    return install(model, methods)


def current_patch(model: torch.nn.Module) -> NNPatch | None:
    return getattr(model, _STATE, None)


def unpatch(model: torch.nn.Module) -> bool:
    """Restore the methods the layers had before :func:`patch`; True if the model was patched."""
    handle = getattr(model, _STATE, None)
    if handle is None:
        return False
    for index, original in handle.originals.items():
        _swap(model, index, original)
    delattr(model, _STATE)
    return True
