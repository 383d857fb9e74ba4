"""``analysis.normgrad``: NormGrad saliency (Rebuffi et al., CVPR 2020, "There and back again").

At a chosen layer with activation x and the gradient g of the explained logit at it, the weight
gradient of a virtual 1x1 identity layer placed there is the sum over locations u of the outer
products g_u x_u^T; NormGrad's saliency of location u is the Frobenius norm of that outer product,
||g_u|| ||x_u||. Locations are the spatial positions of a CNN feature map (B, C, H, W) or the
tokens of a ViT / transformer block output (B, N, C).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import InvalidArgumentError


def _output_tensor(out) -> torch.Tensor:
    """A module's output activation: the tensor itself or the first item of a tuple / model output."""
    if isinstance(out, torch.Tensor):
        return out
    first = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", None)
    if not isinstance(first, torch.Tensor):
        raise InvalidArgumentError("layers", "modules whose output is a tensor (or a tuple starting with one)", type(out).__name__)
    return first


def _logits(out) -> torch.Tensor:
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        raise InvalidArgumentError("model", "a model returning (B, C) or (B, N, C) logits", type(logits).__name__)
    return logits[:, -1] if logits.dim() == 3 else logits


def normgrad(model: nn.Module, inputs, layers: Sequence[str], *, target: int | Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """NormGrad saliency of the logit ``target`` (default: the predicted class; for (B, N, C)
    outputs, at the last position) at the named submodules ``layers`` of ``model``.

    ``inputs``: a tensor (``model(inputs)``) or a mapping (``model(**inputs)``). Returns {layer
    name: saliency}, (B, H, W) for 4-d activations, else (B, N) over the second axis."""
    named = dict(model.named_modules())
    if isinstance(layers, str) or not layers:
        raise InvalidArgumentError("layers", "a non-empty sequence of submodule names", repr(layers))
    for name in layers:
        if name not in named:
            raise InvalidArgumentError("layers", f"names of submodules of the model (e.g. {list(named)[1:4]})", repr(name))
    activations: dict[str, torch.Tensor] = {}
    handles = [named[name].register_forward_hook(lambda m, a, out, name=name: activations.__setitem__(name, _output_tensor(out)))
               for name in layers]
    try:
        with torch.enable_grad():
            out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
            logits = _logits(out)
            chosen = logits.detach().argmax(-1) if target is None else torch.as_tensor(target, device=logits.device).long().reshape(-1).expand(logits.shape[0])
            if (chosen < 0).any() or (chosen >= logits.shape[-1]).any():
                raise InvalidArgumentError("target", f"class indices in [0, {logits.shape[-1] - 1}]", target)
            grads = torch.autograd.grad(logits.gather(-1, chosen[:, None]).sum(), [activations[n] for n in layers])
    finally:
        for h in handles:
            h.remove()
    saliency = {}
    for name, grad in zip(layers, grads):
        x = activations[name].detach()
        channel_axis = 1 if x.dim() == 4 else -1
        saliency[name] = x.norm(dim=channel_axis) * grad.norm(dim=channel_axis)
    return saliency
