"""Input checks shared by the image blocks (ULSAM, ELA, GuidedAttention, GnConv, FocalModulation)."""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError


def check_image(name: str, x: object, channels: int, *, channels_last: bool = False, multiple_of: int = 1) -> None:
    """Raise unless ``x`` is a floating tensor (B, C, H, W) (``channels_last``: (B, H, W, C)) with
    C == ``channels``, B, H, W >= 1 and H, W multiples of ``multiple_of``."""
    layout = "(B, H, W, C)" if channels_last else "(B, C, H, W)"
    if not isinstance(x, torch.Tensor):
        raise InvalidArgumentError(name, f"a tensor {layout}", type(x).__name__)
    if not x.is_floating_point():
        raise InvalidArgumentError(name, "a floating-point tensor", x.dtype)
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
