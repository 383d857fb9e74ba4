"""Per-head decay factors of linear attention with decay (Lightning Attention's ALiBi-style rates)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import InvalidArgumentError, UnsupportedError, check_int
from ...method import Call


def alibi_decay(heads: int, layer_scale: float = 1.0) -> torch.Tensor:
    """TransNormerLLM / Lightning per-head decay ``lambda_h = exp(-2^(-8 (h+1) / H) * layer_scale)``
    in float64 (``layer_scale``: see :func:`layer_scale`)."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, dtype=torch.float64) / heads)
    return torch.exp(-slopes * layer_scale)


def layer_scale(layer: int | None, num_layers: int | None) -> float:
    """TransNormerLLM's per-layer factor on the ALiBi slopes, ``1 - l / (L - 1) + 1e-5`` for layer
    l of L (0-based): the first layer decays fastest, the last almost not at all; 1 when unset."""
    if layer is None:
        return 1.0
    return 1.0 - layer / (num_layers - 1) + 1e-5


def check_layer(layer, num_layers, decay) -> tuple[int | None, int | None]:
    """Config check for ``layer`` / ``num_layers``: both None, or 0 <= layer < num_layers (>= 2)
    with ``decay="alibi"`` (the scaling applies to the ALiBi slopes)."""
    if layer is None and num_layers is None:
        return None, None
    if layer is None or num_layers is None:
        raise InvalidArgumentError("layer, num_layers", "both set or both None", f"layer={layer!r}, num_layers={num_layers!r}")
    num_layers = check_int("num_layers", num_layers, minimum=2)
    layer = check_int("layer", layer, minimum=0)
    if layer >= num_layers:
        raise InvalidArgumentError("layer", f"an index below num_layers={num_layers}", layer)
    if decay != "alibi":
        raise InvalidArgumentError("decay", "'alibi' when layer is set (the per-layer factor scales the ALiBi slopes)", repr(decay))
    return layer, num_layers


def check_decay(value):
    """Config check for ``decay``: None, ``"alibi"``, one factor or one per query head, in (0, 1]."""
    if value is None or value == "alibi":
        return value
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if not values or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not (0 < x <= 1) for x in values):
        raise InvalidArgumentError("decay", "None, 'alibi', a factor in (0, 1] or one per head", repr(value))
    return tuple(float(x) for x in values) if len(values) > 1 else float(values[0])


def decay_for(value, call: Call, scale: float = 1.0) -> torch.Tensor | None:
    """The (Hq,) float64 decay tensor of a checked ``decay`` setting (None: no decay); ``scale``
    multiplies the ALiBi slopes (:func:`layer_scale`)."""
    if value is None:
        return None
    if not call.causal:
        raise UnsupportedError("decay needs causal=True (the decay lambda^(i-j) is defined for keys j <= i)")
    if value == "alibi":
        return alibi_decay(call.heads_q, scale)
    if isinstance(value, tuple):
        if len(value) != call.heads_q:
            raise InvalidArgumentError("decay", f"one factor per query head ({call.heads_q})", f"{len(value)} factors")
        return torch.tensor(value, dtype=torch.float64)
    return torch.full((call.heads_q,), value, dtype=torch.float64)
