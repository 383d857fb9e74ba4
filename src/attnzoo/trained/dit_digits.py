"""``dit-digits``: a small class-conditional Diffusion Transformer (DiT) built from :class:`attnzoo.nn.Attention`,
trained here on the digits (no pretrained diffusion model can be reached offline).

    model, prepare = attnzoo.models.load("dit-digits")
    images = model.sample(torch.arange(10), steps=25, generator=torch.Generator().manual_seed(0))  # (10, 1, 16, 16) in [0, 1]

Images of 16 x 16 pixels (the 8 x 8 digits upscaled, :func:`attnzoo.trained.digits.prepare`) cut into
2 x 2 patches give 64 tokens on an 8 x 8 grid; :func:`sample_accuracy` upscales samples to the 32 x 32
input of ``vit-digits``, its judge. Peebles & Xie's DiT: adaLN-Zero
blocks conditioned on the timestep and the class (a null class for classifier-free guidance), noise
prediction under a cosine schedule; samples by DDIM. Every block's attention runs ``method``; spatial
methods get ``grid=model.grid`` unless given. The weights ship in the package (``weights/dit_digits.pt``,
loaded with torch alone; the JSON beside it holds the config and the training record). Retrain with
``python -m attnzoo.trained.dit_digits --out DIR``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError, check_int
from ..method import Method
from ..nn import Attention
from ..registry import method_class
from . import digits, store
from .vit_digits import ViTConfig

WEIGHTS = store.WEIGHTS
NAME = "dit_digits"


@dataclasses.dataclass(frozen=True)
class DiTConfig(ViTConfig):
    """vit-digits' shape (``grid`` included) at 16 x 16 pixels, plus the ``timesteps`` of the cosine noise schedule."""

    image_size: int = 16
    mlp_dim: int = 192
    timesteps: int = 1000


def alpha_bar(t: torch.Tensor, timesteps: int) -> torch.Tensor:
    """Signal fraction of the cosine schedule (Nichol & Dhariwal) at integer steps ``t`` in [0, timesteps)."""
    s = 0.008
    f = lambda u: torch.cos((u / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    return (f(t.double() + 1) / f(torch.zeros((), dtype=torch.float64))).clamp(1e-5, 1.0).float()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of steps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, dim) normalised, scaled and shifted per sample by (B, dim) vectors."""
    return x * (1 + scale[:, None]) + shift[:, None]


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Tokens (B, rows * cols, p * p), row-major over the grid, each a row-major p x p patch -> images (B, 1, rows * p, cols * p)."""
    rows, cols = grid
    p = patch_size
    return patches.reshape(-1, rows, cols, p, p).permute(0, 1, 3, 2, 4).reshape(-1, 1, rows * p, cols * p)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x (B, N, dim), c (B, dim) -> (B, N, dim); the modulation starts at zero (identity block)."""

    def __init__(self, config: DiTConfig, method: str | Method, method_config: dict[str, Any]):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(config.dim, config.num_heads, method=method, qkv_bias=True, **method_config)
        self.norm2 = nn.LayerNorm(config.dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(config.dim, config.mlp_dim), nn.GELU(approximate="tanh"), nn.Linear(config.mlp_dim, config.dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.dim, 6 * config.dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiTDigits(nn.Module):
    """Noise prediction: noisy images x (B, 1, S, S) in the [-1, 1] scale, steps t (B,), classes y (B,)
    (``num_classes`` is the null class) -> predicted noise (B, 1, S, S)."""

    def __init__(self, config: DiTConfig = DiTConfig(), method: str | Method = "dense", **method_config: Any):
        super().__init__()
        if config.image_size % config.patch_size:
            raise InvalidArgumentError("config.image_size", f"a multiple of patch_size={config.patch_size}", config.image_size)
        self.config, self.grid = config, config.grid
        if isinstance(method, str) and method_class(method).info.spatial:
            method_config = {"grid": self.grid, **method_config}
        p, dim = config.patch_size, config.dim
        self.patch_embed = nn.Conv2d(1, dim, p, stride=p)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid[0] * self.grid[1], dim) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.class_embed = nn.Embedding(config.num_classes + 1, dim)
        self.blocks = nn.ModuleList(DiTBlock(config, method, method_config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, p * p)
        for layer in (self.final_modulation[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        size, p = self.config.image_size, self.config.patch_size
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1:] != (1, size, size):
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise InvalidArgumentError("x", f"a tensor (B, 1, {size}, {size})", got)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.time_mlp(timestep_embedding(t, self.config.dim)) + self.class_embed(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        return unpatchify(self.out(modulate(self.final_norm(tokens), shift, scale)), self.grid, p)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, *, steps: int = 25, guidance: float = 2.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 1, S, S) in [0, 1] of classes ``labels`` (B,): DDIM (deterministic) over ``steps``
        of the schedule, classifier-free ``guidance`` (1: none)."""
        steps = check_int("steps", steps)
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise InvalidArgumentError("labels", "a 1-D tensor of class indices", labels)
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < self.config.num_classes:
            raise InvalidArgumentError("labels", f"class indices in [0, {self.config.num_classes - 1}]", labels.tolist())
        T, size = self.config.timesteps, self.config.image_size
        weight = self.out.weight
        x = torch.randn(len(labels), 1, size, size, generator=generator).to(weight)
        labels = labels.to(weight.device)
        null = torch.full_like(labels, self.config.num_classes)
        schedule = torch.linspace(T - 1, 0, steps).round().long()
        for i, t in enumerate(schedule):
            a = alpha_bar(t, T).to(weight)
            a_next = alpha_bar(schedule[i + 1], T).to(weight) if i + 1 < steps else torch.ones((), dtype=weight.dtype, device=weight.device)
            both = self(torch.cat([x, x]), t.repeat(2 * len(labels)).to(weight.device), torch.cat([labels, null]))
            conditional, unconditional = both.chunk(2)
            eps = unconditional + guidance * (conditional - unconditional)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # the noise consistent with the clipped image
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        return ((x + 1) / 2).clamp(0, 1)


def diffusion_loss(model: DiTDigits, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise-prediction MSE of images (B, 1, S, S) in [0, 1] at uniform random steps (classes kept)."""
    x0 = images * 2 - 1
    t = torch.randint(0, model.config.timesteps, (len(images),), generator=generator)
    a = alpha_bar(t, model.config.timesteps)[:, None, None, None]
    noise = torch.randn(x0.shape, generator=generator)
    return nn.functional.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, labels), noise)


def train(config: DiTConfig = DiTConfig(), *, steps: int = 3500, batch_size: int = 48, lr: float = 1e-3, label_dropout: float = 0.1,
          ema_decay: float = 0.999, seed: int = 0, log: Callable[[str], None] = print) -> tuple[DiTDigits, dict[str, Any]]:
    """Train a dense-attention DiTDigits on the train split (AdamW, warm-up then cosine decay, classes
    dropped to the null class with probability ``label_dropout``); returns the exponential moving
    average of its weights (eval mode) and a record (settings, loss, minutes)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DiTDigits(config)
    ema = copy.deepcopy(model).requires_grad_(False)
    images, labels = digits.load_split("train", config.image_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    record: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "lr": lr, "label_dropout": label_dropout,
                              "ema_decay": ema_decay, "seed": seed, "loss": []}
    start, running = time.perf_counter(), 0.0
    model.train()
    for step in range(steps):
        batch = torch.randint(0, len(images), (batch_size,), generator=generator)
        y = labels[batch].clone()
        y[torch.rand(batch_size, generator=generator) < label_dropout] = config.num_classes
        loss = diffusion_loss(model, images[batch], y, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - ema_decay)
        running += loss.item()
        if (step + 1) % 250 == 0:
            record["loss"].append(round(running / 250, 4))
            running = 0.0
            log(f"step {step + 1}/{steps}: loss {record['loss'][-1]:.4f}, {(time.perf_counter() - start) / 60:.1f} min")
    record["minutes"] = round((time.perf_counter() - start) / 60, 2)
    return ema.eval(), record


def load(*, dtype: torch.dtype | None = None, method: str | Method = "dense", folder: str | Path = WEIGHTS,
         **method_config: Any) -> tuple[DiTDigits, Callable[..., torch.Tensor]]:
    """(model in eval mode, :func:`attnzoo.trained.digits.prepare`, which makes training images from
    raw digits) from the shipped weights (torch only). ``method`` and ``method_config`` choose the
    attention of every block (a learned method's state stays at its init)."""
    return store.load_model(DiTDigits, DiTConfig, NAME, folder, method, method_config, dtype), digits.prepare


@torch.no_grad()
def sample_accuracy(model: DiTDigits, judge: nn.Module, *, per_class: int = 20, steps: int = 25, guidance: float = 2.0,
                    seed: int = 0) -> dict[str, Any]:
    """The judge's (``vit-digits``) agreement with the classes asked for: ``per_class`` samples of
    each class, the fraction of them classified as their class, overall and per class."""
    labels = torch.arange(model.config.num_classes).repeat_interleave(per_class)
    images = model.sample(labels, steps=steps, guidance=guidance, generator=torch.Generator().manual_seed(seed))
    size = judge.config.image_size
    if images.shape[-1] != size:  # upscaled the way the judge's inputs are (digits.prepare: bilinear)
        images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    judged = judge(images.to(next(judge.parameters()).dtype)).argmax(-1).cpu()
    hits = judged == labels
    return {"accuracy": hits.float().mean().item(),
            "per_class": [hits[labels == c].float().mean().item() for c in range(model.config.num_classes)]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attnzoo.trained.dit_digits", description="Train dit-digits.")
    parser.add_argument("--out", default=str(WEIGHTS), help="folder for dit_digits.pt / .json (default: the package's)")
    parser.add_argument("--steps", type=int, default=3500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=DiTConfig.image_size)
    parser.add_argument("--patch-size", type=int, default=DiTConfig.patch_size)
    args = parser.parse_args(argv)
    model, record = train(DiTConfig(image_size=args.image_size, patch_size=args.patch_size), steps=args.steps, seed=args.seed)
    print(f"trained {record['steps']} steps in {record['minutes']} min; wrote {store.save(model, record, NAME, args.out)}")


if __name__ == "__main__":
    main()
