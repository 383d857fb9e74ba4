"""timm's ``VisionTransformer`` with attnzoo attention, through its ``attn_layer=`` argument.

    from attnzoo.integrations.timm import attn_layer
    vit = timm.models.VisionTransformer(img_size=224, patch_size=16, attn_layer=attn_layer("neighborhood", grid=(14, 14),
                                        num_global=1, kernel_size=7))
    vit.load_state_dict(timm_checkpoint)   # timm's fused ``qkv`` / ``proj`` weights load into the layers

Nothing here imports timm (``import timm`` needs torchvision): the layer is an :class:`attnzoo.nn.Attention`
that takes the keyword arguments timm's blocks pass and reads timm's attention weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError, UnsupportedError
from ..method import Method
from ..nn import Attention


class TimmAttention(Attention):
    """:class:`attnzoo.nn.Attention` built the way timm builds its ``Attention`` (``dim``,
    ``num_heads=``, ``qkv_bias=``, ``proj_bias=``, ``proj_drop=``, ...), x (B, N, dim) -> (B, N, dim).
    A state dict in timm's layout (``qkv`` (3 * dim, dim) fused, ``proj``) loads into the separate
    projections. Subclasses made by :func:`attn_layer` fix the method."""

    method_spec: str | Method = "dense"
    method_config: dict[str, Any] = {}

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, qk_norm: bool = False, scale_norm: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, norm_layer=None, device=None, dtype=None,
                 **unsupported: Any):
        for name, value in {"qk_norm": qk_norm, "scale_norm": scale_norm, "attn_drop": attn_drop, **unsupported}.items():
            if value:
                raise UnsupportedError(f"attnzoo timm attn_layer: {name}={value!r} is not supported (plain multi-head attention only)")
        super().__init__(dim, num_heads, method=self.method_spec, qkv_bias=qkv_bias, out_bias=proj_bias, **self.method_config)
        self.proj_drop = nn.Dropout(proj_drop)
        self.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim); timm's ``attn_mask`` and ``is_causal`` are refused when set."""
        if attn_mask is not None:
            raise UnsupportedError(f"attnzoo timm attn_layer: attn_mask of shape {tuple(attn_mask.shape)} is not supported")
        if is_causal:
            raise UnsupportedError("attnzoo timm attn_layer: is_causal=True is not supported (vision attention is bidirectional)")
        return self.proj_drop(super().forward(x))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for kind in ("weight", "bias"):
            fused = state_dict.pop(f"{prefix}qkv.{kind}", None)
            if fused is not None:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3, dim=0)):
                    state_dict[f"{prefix}{name}.{kind}"] = part
            out = state_dict.pop(f"{prefix}proj.{kind}", None)
            if out is not None:
                state_dict[f"{prefix}out_proj.{kind}"] = out
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def attn_layer(method: str | Method = "dense", **config: Any) -> type[TimmAttention]:
    """A :class:`TimmAttention` class running ``method`` (a registered name configured by
    ``**config``, e.g. ``grid=(14, 14), num_global=1`` for spatial methods on a 224 / 16 ViT with a
    CLS token), to pass as ``attn_layer=`` (timm wants a class). A name gives every layer its own
    method; a configured :class:`Method` is shared by all layers."""
    if isinstance(method, Method) and config:
        raise InvalidArgumentError("config", "no options with a configured Method", sorted(config))
    name = method.info.name if isinstance(method, Method) else method
    return type(f"TimmAttention_{name}", (TimmAttention,), {"method_spec": method, "method_config": dict(config)})


__all__ = ["TimmAttention", "attn_layer"]
