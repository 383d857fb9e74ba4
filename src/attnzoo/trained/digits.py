"""scikit-learn's handwritten digits (1797 images, 8 x 8, 17 grey levels) scaled up for vision models.

    images, labels = attnzoo.trained.digits.load_split("train")   # (N, 1, 32, 32) float32 in [0, 1], (N,) int64

The split is fixed (seeded permutation, stratified per class): 70% train, 10% validation, 20% test.
Needs scikit-learn (the ``[demo]`` extra); the data file ships inside scikit-learn, nothing is downloaded.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ..models import ModelUnavailableError

SPLITS = {"train": (0.0, 0.7), "val": (0.7, 0.8), "test": (0.8, 1.0)}
SPLIT_SEED = 0
GREY_LEVELS = 16.0  # the raw pixels are integers 0..16


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ModelUnavailableError("the digits data needs scikit-learn: pip install 'attnzoo[demo]'") from e
    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def split_indices(split: str) -> np.ndarray:
    """Indices into the 1797 digits of ``split`` ("train", "val" or "test"); each class is split in the same ratios."""
    if split not in SPLITS:
        raise InvalidArgumentError("split", f"one of {', '.join(SPLITS)}", repr(split))
    _, labels = _raw()
    low, high = SPLITS[split]
    rng = np.random.default_rng(SPLIT_SEED)
    chosen = []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        chosen.append(members[round(low * len(members)):round(high * len(members))])
    return np.sort(np.concatenate(chosen))


def prepare(images: np.ndarray | torch.Tensor, size: int = 32) -> torch.Tensor:
    """Raw digits (N, 8, 8) with values 0..16 -> (N, 1, size, size) float32 in [0, 1], bilinear upscaling."""
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.dim() != 3 or images.shape[1:] != (8, 8):
        raise InvalidArgumentError("images", "raw digits of shape (N, 8, 8)", f"shape {tuple(images.shape)}")
    scaled = F.interpolate(images[:, None] / GREY_LEVELS, size=(size, size), mode="bilinear", align_corners=False)
    return scaled.clamp(0.0, 1.0)


def load_split(split: str, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, size, size) float32 in [0, 1], labels (N,) int64) of ``split``."""
    images, labels = _raw()
    index = split_indices(split)
    return prepare(images[index], size), torch.from_numpy(labels[index])
