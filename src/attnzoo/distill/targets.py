"""The frozen model being distilled, behind one interface for both kinds attnzoo patches.

A :class:`Target` lists the model's attention layers with their shapes, runs the frozen model as the
teacher (recording each chosen layer's q, k, v, its block's output and the model's output) and runs
it as the student with learned methods in chosen layers (gradients reach only the methods).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import InvalidArgumentError
from ..integrations import attnzoo_nn
from ..method import Method
from .checkpoint import Shape


@dataclass
class QKV:
    """One layer's attention inputs: q (B, Hq, N, D), k and v (B, Hkv, N, D), post-RoPE, detached."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    scale: float


@dataclass
class Signals:
    """What one forward pass gave: ``qkv`` {layer: QKV} (teacher only), ``hidden`` {layer: the output
    (B, N, dim) of the block holding that attention layer}, ``output`` (the model's logits) and, for
    ``attnzoo.nn`` teachers, ``inputs`` / ``outputs`` {layer: the attention layer's x and result (B, N, dim)}."""

    qkv: dict[int, QKV] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    output: torch.Tensor | None = None
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)


class Target:
    """Base: ``shapes`` {layer: (Hq, Hkv, D, Dv)}, ``causal`` {layer: bool}; :meth:`teacher`, :meth:`student`."""

    shapes: dict[int, Shape]
    causal: dict[int, bool]
    kind: str

    def teacher(self, batch: torch.Tensor, layers: list[int]) -> Signals:  # pragma: no cover - abstract
        raise NotImplementedError

    def student(self, batch: torch.Tensor, units: Mapping[int, Method]) -> Signals:  # pragma: no cover - abstract
        """A forward pass with ``units`` (learned methods; for attnzoo.nn models also attention-layer copies) in place."""
        raise NotImplementedError


def _block_of(model: torch.nn.Module, attention: torch.nn.Module) -> torch.nn.Module:
    """The module whose direct child is ``attention`` (a transformer block)."""
    for module in model.modules():
        if any(child is attention for child in module.children()):
            return module
    raise InvalidArgumentError("model", "attention layers inside a block module", "a bare attention layer")


def _hooks_for_outputs(blocks: Mapping[int, torch.nn.Module], into: dict[int, torch.Tensor]) -> list:
    def keep(i):
        return lambda module, args, out: into.__setitem__(i, out[0] if isinstance(out, tuple) else out)
    return [block.register_forward_hook(keep(i)) for i, block in blocks.items()]


class NNTarget(Target):
    """A model built from ``attnzoo.nn.Attention`` layers; ``model(batch)`` is its forward."""

    kind = "attnzoo.nn"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.layers = attnzoo_nn.attention_layers(model)
        if not self.layers:
            raise InvalidArgumentError("model", "a model with attnzoo.nn.Attention layers or a transformers model", type(model).__name__)
        self.shapes = {i: (a.num_heads, a.num_kv_heads, a.head_dim, a.head_dim) for i, a in enumerate(self.layers)}
        self.causal = {i: a.causal for i, a in enumerate(self.layers)}
        self.blocks = {i: _block_of(model, a) for i, a in enumerate(self.layers)}
        self.grid = getattr(model, "grid", None)  # an image model's token grid, for spatial methods

    @torch.no_grad()
    def teacher(self, batch, layers):
        signals = Signals()

        def record(i):
            def hook(module, args, kwargs):
                q, k, v = args
                scale = kwargs.get("scale") or q.shape[-1] ** -0.5
                signals.qkv[i] = QKV(q.detach(), k.detach(), v.detach(), bool(kwargs.get("causal", False)), float(scale))
            return hook
        def inputs_and_outputs(i):
            def hook(module, args, out):
                signals.inputs[i], signals.outputs[i] = args[0], out
            return hook
        hooks = [self.layers[i].method.register_forward_pre_hook(record(i), with_kwargs=True) for i in layers]
        hooks += [self.layers[i].register_forward_hook(inputs_and_outputs(i)) for i in layers]
        hooks += _hooks_for_outputs({i: self.blocks[i] for i in layers}, signals.hidden)
        try:
            signals.output = self.model(batch)
        finally:
            for h in hooks:
                h.remove()
        return signals

    def student(self, batch, methods):
        signals = Signals()
        hooks = _hooks_for_outputs({i: self.blocks[i] for i in methods}, signals.hidden)
        with attnzoo_nn.install(self.model, dict(methods)):
            try:
                signals.output = self.model(batch)
            finally:
                for h in hooks:
                    h.remove()
        return signals


class HFTarget(Target):
    """A transformers model; ``batch`` is token ids (B, N); the output is the logits (or last hidden state)."""

    kind = "transformers"

    def __init__(self, model):
        from ..integrations.transformers import attention_modules

        self.model = model
        found = attention_modules(model)
        self.shapes = {a.index: (a.heads, a.kv_heads, a.head_dim, a.head_dim) for a in found}
        self.causal = {a.index: a.causal for a in found}

    def _run(self, batch):
        out = self.model(input_ids=batch, output_hidden_states=True)
        return out, getattr(out, "logits", None)

    @torch.no_grad()
    def teacher(self, batch, layers):
        from ..integrations.transformers import capture

        with capture(self.model, layers) as recorded:
            out, logits = self._run(batch)
        signals = Signals(output=logits if logits is not None else out.hidden_states[-1])
        for i in layers:
            r = recorded.first(i)
            signals.qkv[i] = QKV(r.q, r.k, r.v, r.causal, r.scale)
            signals.hidden[i] = out.hidden_states[i + 1]
        return signals

    def student(self, batch, methods):
        from ..integrations.transformers import patch

        with patch(self.model, layers=dict(methods)):
            out, logits = self._run(batch)
        return Signals(hidden={i: out.hidden_states[i + 1] for i in methods},
                       output=logits if logits is not None else out.hidden_states[-1])


def target_for(model) -> Target:
    """The :class:`Target` of ``model``: an ``attnzoo.nn`` model or a transformers one."""
    if attnzoo_nn.is_attnzoo_model(model):
        return NNTarget(model)
    return HFTarget(model)
