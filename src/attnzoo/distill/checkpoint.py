"""Distillation checkpoints: ``config.json`` (what was trained, on which layers and shapes, up to which step),
``weights.safetensors`` (every trained layer's learned state, keys ``"{layer}.{name}"``), ``optimizer.safetensors``
and ``metrics.jsonl``. Loading the learned state needs safetensors (the ``[models]`` extra) and torch only."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError, UnsupportedError
from ..method import Method
from ..registry import get_method
from ..models import ModelUnavailableError

FORMAT = "attnzoo-distill/1"
CONFIG, WEIGHTS, OPTIMIZER, METRICS = "config.json", "weights.safetensors", "optimizer.safetensors", "metrics.jsonl"

Shape = tuple[int, int, int, int]  # query heads, key/value heads, head dim, value head dim


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise ModelUnavailableError("distillation checkpoints need safetensors: pip install 'attnzoo[models]'") from e
    return st


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary file renamed over ``path``: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save(folder: Path, config: Mapping[str, Any], methods: Mapping[int, torch.nn.Module], optimizer: torch.optim.Optimizer | None) -> None:
    """Write the checkpoint files (weights and optimizer first, the config naming the step last)."""
    st = _safetensors()
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}.{name}": t.detach().contiguous().cpu() for i, m in methods.items() for name, t in m.state_dict().items()}
    _write_atomic(folder / WEIGHTS, lambda p: st.save_file(tensors, str(p)))
    if optimizer is not None:
        state = optimizer.state_dict()
        flat = {f"{index}.{name}": t.detach().contiguous().cpu() for index, entry in state["state"].items() for name, t in entry.items()}
        _write_atomic(folder / OPTIMIZER, lambda p: st.save_file(flat, str(p)))
    _write_atomic(folder / CONFIG, lambda p: p.write_text(json.dumps({"format": FORMAT, **config}, indent=1) + "\n"))


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``config.json``; a clear error when the folder holds none."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise InvalidArgumentError("weights", f"a folder written by attnzoo distill (with {CONFIG})", str(folder))
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise InvalidArgumentError("weights", f"a checkpoint of format {FORMAT!r}", f"format {data.get('format')!r} in {path}")
    return data


def load_optimizer(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore ``optimizer``'s per-parameter state from ``optimizer.safetensors`` (its groups stay as built)."""
    flat = _safetensors().load_file(str(folder / OPTIMIZER))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def build_methods(method: str, method_config: Mapping[str, Any], shapes: Mapping[int, Shape]) -> dict[int, Method]:
    """One fresh ``method`` per layer, materialised for the layer's shape."""
    methods = {}
    for i, shape in shapes.items():
        methods[i] = get_method(method, **method_config)
        methods[i].materialize(*shape)
    return methods


def load_weights(folder: Path, methods: Mapping[int, torch.nn.Module]) -> None:
    """Load ``weights.safetensors`` into ``methods`` ({layer: Method, or Attention copy}); every key must fit."""
    flat = _safetensors().load_file(str(folder / WEIGHTS))
    for i, m in methods.items():
        prefix = f"{i}."
        state = {key[len(prefix):]: t for key, t in flat.items() if key.startswith(prefix)}
        try:
            m.load_state_dict(state)
        except RuntimeError as e:
            raise InvalidArgumentError("weights", f"learned state that fits layer {i}'s {type(m).__name__}",
                                       f"a mismatch ({str(e).splitlines()[0]}...) in {folder / WEIGHTS}") from None


def _checked(folder, method: Any, shapes: Mapping[int, Shape]) -> tuple[dict[str, Any], dict[int, Shape]]:
    """The checkpoint's config and {layer: shape}, checked against the ``method`` named and the model's ``shapes``."""
    data = read_config(folder)
    if method != data["method"]:
        raise InvalidArgumentError("method", f"{data['method']!r} (the method the checkpoint in {folder} trained)", repr(method))
    layers = {int(i): tuple(shape) for i, shape in data["layers"].items()}
    for i, shape in layers.items():
        if shapes.get(i) != shape:
            got = "no such layer" if i not in shapes else f"(heads, kv heads, head dim, value dim) {shapes[i]}"
            raise InvalidArgumentError("weights", f"a checkpoint for this model (layer {i} trained with shape {shape})", got)
    return data, layers


def trained_methods(folder: str | os.PathLike, method: Any, config: Mapping[str, Any], shapes: Mapping[int, Shape]) -> dict[int, Method]:
    """{layer: Method} with the learned state of checkpoint ``folder``, for ``attnzoo.patch(model, method,
    weights=folder, **config)``: ``method`` must be the checkpoint's method name; ``config`` overrides its
    inference options (e.g. ``threshold=``); the checkpoint's layer shapes must be the model's ``shapes``."""
    data, layers = _checked(folder, method, shapes)
    if data.get("unit", "method") != "method":
        raise UnsupportedError(f"the checkpoint in {folder} trained whole attention layers ({data['recipe']!r}); "
                               "it loads into the attnzoo.nn model it was trained on")
    methods = build_methods(method, {**data["method_config"], **config}, layers)
    load_weights(Path(folder), methods)
    return methods


def trained_units(folder: str | os.PathLike, method: Any, config: Mapping[str, Any], found: list) -> dict[int, Any]:
    """:func:`trained_methods` for a model of ``attnzoo.nn.Attention`` layers ``found``; checkpoints of
    recipes that train whole layers give trained copies of them ({layer: Attention})."""
    from ..integrations.attnzoo_nn import attention_copy

    shapes = {i: (a.num_heads, a.num_kv_heads, a.head_dim, a.head_dim) for i, a in enumerate(found)}
    data, layers = _checked(folder, method, shapes)
    if data.get("unit", "method") == "method":
        return trained_methods(folder, method, config, shapes)
    units = {i: attention_copy(found[i], method, {**data["method_config"], **config}) for i in layers}
    load_weights(Path(folder), units)
    return units


def save_features(path: Path, features: Mapping[int, Mapping[str, Any]], fingerprint: str) -> None:
    """One example's teacher features {layer: {name: tensor or number}} as ``path`` (safetensors; numbers and
    ``fingerprint``, what they were computed for, in its metadata)."""
    tensors = {f"{i}.{name}": v.detach().contiguous().cpu() for i, f in features.items() for name, v in f.items() if torch.is_tensor(v)}
    numbers = {f"{i}.{name}": v for i, f in features.items() for name, v in f.items() if not torch.is_tensor(v)}
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"fingerprint": fingerprint, "numbers": json.dumps(numbers)}
    _write_atomic(path, lambda p: _safetensors().save_file(tensors, str(p), metadata=metadata))


def load_features(path: Path, fingerprint: str, device) -> dict[int, dict[str, Any]] | None:
    """The features :func:`save_features` wrote to ``path`` for this ``fingerprint``, on ``device``; None if absent or other."""
    if not path.is_file():
        return None
    st = _safetensors()
    with st.safe_open(str(path), framework="pt", device=str(device)) as f:
        metadata = f.metadata() or {}
        if metadata.get("fingerprint") != fingerprint:
            return None
        entries = {key: f.get_tensor(key) for key in f.keys()} | json.loads(metadata["numbers"])
    features: dict[int, dict[str, Any]] = {}
    for key, value in entries.items():
        layer, name = key.split(".", 1)
        features.setdefault(int(layer), {})[name] = value
    return features
