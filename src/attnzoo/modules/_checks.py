"""Input checks shared by the modules: each names the argument, the expected layout and what came."""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError


def _floating(name: str, t: object, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(name, f"a torch.Tensor {layout}", type(t).__name__)
    if not t.is_floating_point():
        raise InvalidArgumentError(name, "a floating-point tensor", t.dtype)
    return t


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
    _floating(name, t, layout)
    if dtype is not None and t.dtype != dtype and not torch.is_autocast_enabled(t.device.type):
        raise InvalidArgumentError(name, f"dtype {dtype} (the parameters'; convert with .to() or use autocast)", t.dtype)
    return t


def check_image(name: str, x: object, channels: int, *, channels_last: bool = False, multiple_of: int = 1) -> None:
    """Raise unless ``x`` is a floating tensor (B, C, H, W) (``channels_last``: (B, H, W, C)) with
    C == ``channels``, B, H, W >= 1 and H, W multiples of ``multiple_of``."""
    layout = "(B, H, W, C)" if channels_last else "(B, C, H, W)"
    _floating(name, x, layout)
    if x.dim() != 4:
        raise InvalidArgumentError(name, f"a 4-D tensor {layout}", f"shape {tuple(x.shape)}")
    c = x.shape[-1] if channels_last else x.shape[1]
    if c != channels:
        raise InvalidArgumentError(name, f"{channels} channels ({layout}, the module's configuration)", f"{c} (shape {tuple(x.shape)})")
    h, w = x.shape[1:3] if channels_last else x.shape[2:]
    if x.shape[0] == 0 or h == 0 or w == 0:
        raise InvalidArgumentError(name, "a non-empty batch and image", f"shape {tuple(x.shape)}")
    if h % multiple_of or w % multiple_of:
        raise InvalidArgumentError(name, f"H and W multiples of {multiple_of}", f"H={h}, W={w}")
