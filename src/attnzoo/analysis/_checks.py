"""Argument checks shared by the analysis tools."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InvalidArgumentError


def check_probs(name: str, probs: object) -> torch.Tensor:
    """``probs`` as a floating (B, H, Nq, Nk) tensor; a (H, Nq, Nk) one gets a batch axis of 1."""
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point():
        raise InvalidArgumentError(name, "a floating torch.Tensor of attention probabilities", type(probs).__name__)
    if probs.dim() not in (3, 4):
        raise InvalidArgumentError(name, "shape (B, H, Nq, Nk) or (H, Nq, Nk)", tuple(probs.shape))
    return probs if probs.dim() == 4 else probs.unsqueeze(0)


def check_layers(name: str, maps: object) -> list[torch.Tensor]:
    """A non-empty sequence of per-layer (B?, H, Nq, Nk) probabilities of one shape, as (B, H, Nq, Nk) tensors."""
    if isinstance(maps, torch.Tensor) or not isinstance(maps, Sequence) or len(maps) == 0:
        raise InvalidArgumentError(name, "a non-empty sequence of per-layer (B?, H, Nq, Nk) tensors", type(maps).__name__)
    layers = [check_probs(f"{name}[{i}]", m) for i, m in enumerate(maps)]
    for i, m in enumerate(layers):
        if m.shape != layers[0].shape:
            raise InvalidArgumentError(f"{name}[{i}]", f"the shape of {name}[0], {tuple(layers[0].shape)}", tuple(m.shape))
    return layers
