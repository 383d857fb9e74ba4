"""``analysis.record``: run a transformers model once and keep what its attention layers did.

Built on :func:`attnzoo.integrations.transformers.capture`: per layer the attention probabilities
(B, H, N, N) (on a patched model, each method's probabilities: what a sparse method keeps) and,
on request, the post-RoPE q (B, Hq, N, D), k and v (B, Hkv, N, D), with the tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidArgumentError


@dataclass
class Recording:
    """One forward pass. ``layers``: the recorded layer indices; ``probs[i]`` (B, H, N, N) float32
    for ``layers[i]``; ``q``/``k``/``v``: per layer, or None; ``tokens``: per batch item the token
    strings (None without a tokenizer); ``input_ids`` (B, N), None for pixel inputs; ``attention_mask`` (B, N) or None;
    ``causal``: whether the model's attention is causal; ``output``: the model's output."""

    layers: list[int]
    probs: list[torch.Tensor]
    input_ids: torch.Tensor | None
    causal: bool
    output: Any = None
    tokens: list[list[str]] | None = None
    attention_mask: torch.Tensor | None = None
    q: list[torch.Tensor] | None = None
    k: list[torch.Tensor] | None = None
    v: list[torch.Tensor] | None = None
    plans: list[Any] | None = None

    def layer(self, index: int) -> torch.Tensor:
        """(B, H, N, N) probabilities of model layer ``index``."""
        if index not in self.layers:
            raise InvalidArgumentError("index", f"a recorded layer (recorded: {self.layers})", index)
        return self.probs[self.layers.index(index)]


def context_length(model) -> int | None:
    """The model's longest input (``config.max_position_embeddings``), None where it states none."""
    return getattr(model.config, "max_position_embeddings", None)


def model_inputs(model, inputs: object, tokenizer=None) -> dict[str, torch.Tensor]:
    """``inputs`` (a string with a ``tokenizer``, a (B, N) or (N,) LongTensor of ids, or a mapping
    with ``input_ids``, or with ``pixel_values`` for a vision model) as keyword arguments for the
    model on its device, token ids checked against its context length."""
    if isinstance(inputs, str):
        if tokenizer is None:
            raise InvalidArgumentError("tokenizer", "a tokenizer when inputs is text", None)
        inputs = dict(tokenizer(inputs, return_tensors="pt"))
    elif isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs if inputs.dim() == 2 else inputs.unsqueeze(0)}
    device = next(model.parameters()).device
    if isinstance(inputs, Mapping) and "input_ids" not in inputs and isinstance(inputs.get("pixel_values"), torch.Tensor):
        return {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}
    if not isinstance(inputs, Mapping) or not isinstance(inputs.get("input_ids"), torch.Tensor):
        raise InvalidArgumentError("inputs", "text (with a tokenizer), a LongTensor of ids or a mapping with 'input_ids' "
                                   "(or 'pixel_values' for a vision model)", type(inputs).__name__)
    ids = inputs["input_ids"]
    if ids.dim() != 2 or ids.dtype != torch.long or ids.shape[1] == 0:
        raise InvalidArgumentError("inputs['input_ids']", "a non-empty (B, N) LongTensor", f"{ids.dtype} {tuple(ids.shape)}")
    limit = context_length(model)
    if limit is not None and ids.shape[1] > limit:
        raise InvalidArgumentError("inputs", f"at most {limit} tokens (the model's context length)", f"{ids.shape[1]} tokens")
    return {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}


def record(model, inputs: object, layers: Iterable[int] | None = None, *, tokenizer=None, qkv: bool = False,
           grad: bool = False) -> Recording:
    """Run ``model`` on ``inputs`` once and record the attention of ``layers`` (default all).

    ``inputs``: see :func:`model_inputs`; ``tokenizer`` also names the tokens; ``qkv``: keep the
    post-RoPE q, k, v; ``grad``: run with gradients on (the probabilities are detached either way).
    Works on unpatched and patched models. Raises InvalidArgumentError for a layer out of range or
    an input over the context length, UnsupportedError for a model whose attention cannot be read."""
    from ..integrations.transformers import capture

    with capture(model, layers, qkv=qkv, probs=True) as cap, torch.set_grad_enabled(grad):
        kwargs = model_inputs(model, inputs, tokenizer)
        output = model(**kwargs)
    chosen = sorted(cap.records)
    first = [cap.first(i) for i in chosen]
    ids = kwargs["input_ids"].cpu() if "input_ids" in kwargs else None
    tokens = None if tokenizer is None or ids is None else [tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]
    pick = (lambda name: [getattr(r, name) for r in first]) if qkv else (lambda name: None)
    mask = kwargs.get("attention_mask")
    return Recording(layers=chosen, probs=[r.probs for r in first], input_ids=ids, causal=first[0].causal, output=output,
                     tokens=tokens, attention_mask=None if mask is None else mask.cpu(), q=pick("q"), k=pick("k"), v=pick("v"),
                     plans=[r.plan for r in first])


def to_image_grid(model, values: torch.Tensor) -> torch.Tensor:
    """(B, N) values over a ViT's tokens (e.g. the CLS row of :func:`~.flow.rollout`) -> (B, *grid)
    over its patch grid, the leading CLS token dropped."""
    from ..integrations.transformers import token_layout

    layout = token_layout(model)
    if layout is None:
        raise InvalidArgumentError("model", "a ViT-style model with a CLS token and a patch grid", type(model).__name__)
    if values.dim() != 2 or values.shape[1] != layout.tokens:
        raise InvalidArgumentError("values", f"(B, {layout.tokens}) values, one per image token", tuple(values.shape))
    return values[:, layout.num_global:].reshape(values.shape[0], *layout.grid)
