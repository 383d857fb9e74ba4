"""Input checks shared by the vision blocks (cross-scale, selective dense, class-semantics,
sentence attention, tag queries): one place that names the argument, the expected layout and what came."""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError


def check_tensor(name: str, t: object, shape: tuple[int | None, ...], layout: str,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``t`` if it is a non-empty floating tensor of ``len(shape)`` dims whose sizes match
    ``shape`` (None: any size); ``layout`` names the axes, e.g. ``"(batch, 64, height, width)"``;
    ``dtype``: the parameters' dtype it must have (outside autocast)."""
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(name, f"a torch.Tensor {layout}", type(t).__name__)
    matches = t.dim() == len(shape) and all(want is None or got == want for got, want in zip(t.shape, shape))
    if not matches or t.numel() == 0:
        raise InvalidArgumentError(name, f"a non-empty {len(shape)}-D tensor {layout}", f"shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise InvalidArgumentError(name, "a floating-point tensor", t.dtype)
    if dtype is not None and t.dtype != dtype and not torch.is_autocast_enabled(t.device.type):
        raise InvalidArgumentError(name, f"dtype {dtype} (the parameters'; convert with .to() or use autocast)", t.dtype)
    return t
