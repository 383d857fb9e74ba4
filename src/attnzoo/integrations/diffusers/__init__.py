"""Run attnzoo methods inside diffusers models and pipelines (FLUX, SD3, DiT, UNet); see :mod:`.adapter`.

diffusers stays optional (the ``[diffusers]`` extra): this package imports it on first use.
"""

from .adapter import (
    TEXT_PLACEMENT,
    DiffusersPatch,
    LatentLayout,
    RoutedProcessor,
    attention_modules,
    current_patch,
    denoiser_of,
    patch,
    unpatch,
)

__all__ = ["DiffusersPatch", "LatentLayout", "RoutedProcessor", "TEXT_PLACEMENT", "attention_modules", "current_patch", "denoiser_of",
           "patch", "unpatch"]
