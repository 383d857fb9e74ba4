"""Capture the real post-RoPE q, k, v that a model's attention layers receive (built on
:func:`attnzoo.integrations.transformers.capture`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError
from .common import english_text, model_device
from .perplexity import token_ids


@dataclass
class CapturedQKV:
    """One layer's attention inputs: q (B, Hq, N, D), k and v (B, Hkv, N, D) as the model's
    attention function received them (post-RoPE; GQA key/value heads not repeated)."""

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    scale: float

    def as_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in "qkv"},
                "shape_q": list(self.q.shape), "shape_kv": list(self.k.shape)}


@torch.no_grad()
def capture_qkv(model, tokenizer, text: str | None = None, layers: Iterable[int] | None = None, *,
                max_tokens: int | None = 4096) -> dict[int, CapturedQKV]:
    """{layer: CapturedQKV} from one forward pass of ``model`` (unpatched) over the first
    ``max_tokens`` tokens of ``text`` (default: :func:`~attnzoo.eval.english_text`); ``layers``:
    indices (default all). Tensors are detached, on the CPU, in the model's dtype."""
    from ..integrations.transformers import capture, current_patch

    if current_patch(model) is not None:
        raise InvalidArgumentError("model", "an unpatched model (capture_qkv records exact attention inputs)", "a patched model")
    ids = token_ids(tokenizer, english_text() if text is None else text)
    if max_tokens is not None:
        if len(ids) < max_tokens:
            raise InvalidArgumentError("max_tokens", f"at most {len(ids)} (the length of the text in tokens)", max_tokens)
        ids = ids[:max_tokens]
    with capture(model, layers) as recorded:  # checks the layer indices
        model.base_model(input_ids=ids[None].to(model_device(model)))
    captured = {}
    for i in recorded.records:
        record = recorded.first(i)
        captured[i] = CapturedQKV(i, record.q, record.k, record.v, record.causal, record.scale)
    return captured
