"""``vit-digits``: a small Vision Transformer built from :class:`attnzoo.nn.Attention`, trained here on the digits.

    model, prepare = attnzoo.models.load("vit-digits")
    logits = model(prepare(raw_digits))              # raw (B, 8, 8) 0..16 -> images (B, 1, 32, 32) -> (B, 10)

Images of 32 x 32 pixels cut into 2 x 2 patches give 256 tokens on a 16 x 16 grid (row-major, no class
token: the head reads the mean token), so spatial methods take ``grid=model.grid``. The weights ship
in the package (``weights/vit_digits.pt``, loaded with torch alone; the JSON beside it holds the config
and the training record). Retrain with ``python -m attnzoo.trained.vit_digits --out DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..method import Method
from ..nn import Attention
from . import digits, store

WEIGHTS = store.WEIGHTS
NAME = "vit_digits"


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Shape of the model: ``image_size`` pixels per side cut into ``patch_size`` patches; ``depth`` blocks."""

    image_size: int = 32
    patch_size: int = 2
    dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 128
    num_classes: int = 10

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side


class Block(nn.Module):
    """Pre-norm transformer block: x (B, N, dim) -> (B, N, dim)."""

    def __init__(self, config: ViTConfig, method: str | Method, method_config: dict[str, Any]):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim)
        self.attn = Attention(config.dim, config.num_heads, method=method, **method_config)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(nn.Linear(config.dim, config.mlp_dim), nn.GELU(), nn.Linear(config.mlp_dim, config.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTDigits(nn.Module):
    """images (B, 1, S, S) -> logits (B, num_classes); every block's attention runs ``method``."""

    def __init__(self, config: ViTConfig = ViTConfig(), method: str | Method = "dense", **method_config: Any):
        super().__init__()
        if config.image_size % config.patch_size:
            raise InvalidArgumentError("config.image_size", f"a multiple of patch_size={config.patch_size}", config.image_size)
        self.config = config
        self.grid = config.grid
        tokens = self.grid[0] * self.grid[1]
        self.patch_embed = nn.Conv2d(1, config.dim, config.patch_size, stride=config.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, config.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(config, method, method_config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.num_classes)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 1, S, S) -> patch tokens with positions (B, N, dim)."""
        size = self.config.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1:] != (1, size, size):
            got = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise InvalidArgumentError("images", f"a tensor (B, 1, {size}, {size})", got)
        return self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.tokens(images)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


def shift_augment(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image (B, 1, S, S) by up to ``max_shift`` pixels per axis, zero-filled."""
    size = images.shape[-1]
    padded = nn.functional.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    return torch.stack([padded[i, :, r:r + size, c:c + size] for i, (r, c) in enumerate(offsets.tolist())])


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of ``images`` (N, 1, S, S) whose arg-max logit is the label."""
    model.eval()
    correct = sum((model(images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def train(config: ViTConfig = ViTConfig(), *, epochs: int = 30, batch_size: int = 32, lr: float = 1e-3,
          weight_decay: float = 0.05, max_shift: int = 2, seed: int = 0,
          log: Callable[[str], None] = print) -> tuple[ViTDigits, dict[str, Any]]:
    """Train a dense-attention ViTDigits on the train split (AdamW, cosine schedule, shift augmentation).

    Returns the model (eval mode) and a record: settings, per-epoch validation accuracy, test accuracy, minutes."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ViTDigits(config)
    images, labels = digits.load_split("train", config.image_size)
    val_images, val_labels = digits.load_split("val", config.image_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1)
    record: dict[str, Any] = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                              "max_shift": max_shift, "seed": seed, "val_accuracy": []}
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(images), batch_size):
            batch = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(shift_augment(images[batch], max_shift, generator)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        record["val_accuracy"].append(accuracy(model, val_images, val_labels))
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, val accuracy {record['val_accuracy'][-1]:.4f}, "
            f"{(time.perf_counter() - start) / 60:.1f} min")
    record["minutes"] = round((time.perf_counter() - start) / 60, 2)
    record["test_accuracy"] = accuracy(model, *digits.load_split("test", config.image_size))
    return model.eval(), record


def save(model: ViTDigits, record: dict[str, Any], folder: str | Path = WEIGHTS) -> Path:
    """Write ``NAME.pt`` (the state dict) and ``NAME.json`` (config and record) into ``folder``."""
    return store.save(model, record, NAME, folder)


def metadata(folder: str | Path = WEIGHTS) -> dict[str, Any]:
    """The JSON written beside the weights: {"config": ..., "record": ...}."""
    return store.metadata(NAME, folder)


def load(*, dtype: torch.dtype | None = None, method: str | Method = "dense", folder: str | Path = WEIGHTS,
         **method_config: Any) -> tuple[ViTDigits, Callable[..., torch.Tensor]]:
    """(model in eval mode, :func:`attnzoo.trained.digits.prepare`) from the shipped weights (torch only).

    ``method`` and ``method_config`` choose the attention of every block (learned state stays at its init)."""
    return store.load_model(ViTDigits, ViTConfig, NAME, folder, method, method_config, dtype), digits.prepare


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attnzoo.trained.vit_digits", description="Train vit-digits.")
    parser.add_argument("--out", default=str(WEIGHTS), help="folder for vit_digits.pt / .json (default: the package's)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, record = train(epochs=args.epochs, seed=args.seed)
    print(f"test accuracy {record['test_accuracy']:.4f} after {record['minutes']} min; wrote {save(model, record, args.out)}")


if __name__ == "__main__":
    main()
