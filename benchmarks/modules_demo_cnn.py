"""Group A's blocks (ULSAM, ELA, GuidedAttention, GnConv, FocalModulation) inside a small CNN on
cluttered digits, each against a plain-convolution baseline of the same parameter budget.

    python benchmarks/modules_demo_cnn.py [--seed 0] [--steps 500]

Data (offline): scikit-learn's 8x8 digits, split 75/25 by image; every sample is a 24x24 canvas
with one digit at a random place and six 4x4 fragments of other digits of the same split as
clutter; the label is the digit. Model: conv stem (24x24) -> stride-2 conv (12x12) -> the slot ->
stride-2 conv to 2x width (6x6) -> global average pool -> linear. The module model puts the block
in the slot (ULSAM and ELA as they are, they keep the input in their output; GnConv and
FocalModulation as pre-norm residual token mixers, as HorNet and FocalNet use them;
GuidedAttention refines the 12x12 features with a fused map made of them and a coarser 6x6 view,
and its guidance and reconstruction losses join the loss with weight 0.1 each). The baseline puts
a residual 3x3 conv + BatchNorm + ReLU in the slot, with the width of the whole network chosen so
its parameter count is the nearest to the module model's (both counts printed). Both models start
from the same seed and see the same batches (Adam, cross-entropy); the metric is test accuracy.
One thread; the table prints each model's steps (GuidedAttention's are 0.4 of --steps, its
models being ~4x slower a step) and the seconds of both models together.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnzoo import modules

CANVAS, TILE, FRAGMENT, CLUTTER = 24, 8, 4, 6
WIDTH = 32  # width of the module models; GuidedAttention's guiding encoder-decoder alone has
GUIDED_WIDTH = 8  # ~1.7M parameters per step at 32 channels, so its model is 8 wide
BATCH, LEARNING_RATE, AUX_WEIGHT = 64, 3e-3, 0.1


def load_splits(seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Digits (N, 8, 8) in [0, 1] and labels (N,), split into train and test by image."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise SystemExit("this demonstration needs scikit-learn: pip install 'attnzoo[demo]'") from error
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(images, digits.target, test_size=0.25, random_state=seed,
                                                        stratify=digits.target)
    return (train_x, train_y), (test_x, test_y)


def cluttered(images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` canvases (count, 1, 24, 24): one digit of ``images`` at a random place over six
    random 4x4 fragments of others (pixel-wise max), and its label (count,)."""
    canvases = np.zeros((count, CANVAS, CANVAS), dtype=np.float32)
    picks = rng.integers(len(images), size=count)
    for canvas, pick in zip(canvases, picks):
        for _ in range(CLUTTER):
            source = images[rng.integers(len(images))]
            sy, sx = rng.integers(TILE - FRAGMENT + 1, size=2)
            y, x = rng.integers(CANVAS - FRAGMENT + 1, size=2)
            canvas[y:y + FRAGMENT, x:x + FRAGMENT] = source[sy:sy + FRAGMENT, sx:sx + FRAGMENT]
        y, x = rng.integers(CANVAS - TILE + 1, size=2)
        np.maximum(canvas[y:y + TILE, x:x + TILE], images[pick], out=canvas[y:y + TILE, x:x + TILE])
    return torch.from_numpy(canvases).unsqueeze(1), torch.from_numpy(labels[picks]).long()


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv + BatchNorm + ReLU: (B, c_in, H, W) -> (B, c_out, H / stride, W / stride)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Module):
    """x + body(norm(x)) on (B, C, H, W); ``channels_last`` runs norm and body on (B, H, W, C)."""

    def __init__(self, channels: int, body: nn.Module, *, channels_last: bool = False, norm: bool = True):
        super().__init__()
        self.channels_last = channels_last
        self.norm = (nn.LayerNorm(channels) if channels_last else nn.GroupNorm(1, channels)) if norm else nn.Identity()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return x + self.body(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x + self.body(self.norm(x))


class GuidedSlot(nn.Module):
    """GuidedAttention on (B, C, H, W) features with a fused map of them and a stride-2 view of
    them (upsampled back); keeps the block's guiding losses in ``aux_loss`` after each forward."""

    def __init__(self, channels: int):
        super().__init__()
        self.coarse = conv_bn_relu(channels, channels, stride=2)
        self.fuse = nn.Conv2d(2 * channels, channels, 1)
        self.attention = modules.create("GuidedAttention", channels=channels)
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coarse = F.interpolate(self.coarse(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        refined, losses = self.attention(x, self.fuse(torch.cat([x, coarse], dim=1)), return_losses=True)
        self.aux_loss = losses["guidance"] + losses["reconstruction"]
        return refined


# module -> (width of the module model, its slot for a width, share of --steps it trains for:
# GuidedAttention's models take ~4x longer a step, so they train for fewer to fit 90 s)
SLOTS = {
    "ULSAM": (WIDTH, lambda c: modules.create("ULSAM", channels=c, num_subspaces=4), 1.0),
    "ELA": (WIDTH, lambda c: modules.create("ELA", channels=c, variant="B"), 1.0),
    "GuidedAttention": (GUIDED_WIDTH, GuidedSlot, 0.4),
    "GnConv": (WIDTH, lambda c: Residual(c, modules.create("GnConv", channels=c, order=3)), 1.0),
    "FocalModulation": (WIDTH, lambda c: Residual(c, modules.create("FocalModulation", dim=c, focal_level=2), channels_last=True), 1.0),
}


def plain_slot(channels: int) -> nn.Module:
    """The baseline's slot: a residual 3x3 conv + BatchNorm + ReLU."""
    return Residual(channels, conv_bn_relu(channels, channels), norm=False)


class Classifier(nn.Module):
    """(B, 1, 24, 24) canvases -> (B, 10) logits, with ``slot`` at 12x12 and ``width`` channels."""

    def __init__(self, width: int, slot: nn.Module):
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(1, width), conv_bn_relu(width, width, stride=2), slot,
                                      conv_bn_relu(width, 2 * width, stride=2))
        self.slot = slot
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def count(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def matched_width(budget: int) -> int:
    """The width of the plain-slot classifier whose parameter count is the nearest to ``budget``."""
    return min(range(4, 513), key=lambda w: abs(count(Classifier(w, plain_slot(w))) - budget))


def train_and_test(model: Classifier, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                   steps: int, seed: int) -> float:
    """Train ``model`` for ``steps`` batches drawn from ``seed``; its test accuracy."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(train[0]), (BATCH,), generator=order)
        loss = F.cross_entropy(model(train[0][batch]), train[1][batch])
        loss = loss + AUX_WEIGHT * getattr(model.slot, "aux_loss", 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(-1) for chunk in test[0].split(500)])
    return (predictions == test[1]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--only", nargs="*", default=list(SLOTS), choices=list(SLOTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    (train_x, train_y), (test_x, test_y) = load_splits(args.seed)
    rng = np.random.default_rng(args.seed)
    train, test = cluttered(train_x, train_y, 6000, rng), cluttered(test_x, test_y, 2000, rng)
    print(f"seed {args.seed}; batches of {BATCH}, the steps column is per model; train {len(train[1])} / test {len(test[1])} "
          f"cluttered {CANVAS}x{CANVAS} digits (train and test digits disjoint); 1 thread")
    print("| module | task | params (module model / baseline) | acc module | acc baseline | steps | seconds |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in args.only:
        start = time.perf_counter()
        torch.manual_seed(args.seed)
        width, slot, share = SLOTS[name]
        steps = round(args.steps * share)
        model = Classifier(width, slot(width))
        baseline_width = matched_width(count(model))
        torch.manual_seed(args.seed)
        baseline = Classifier(baseline_width, plain_slot(baseline_width))
        accuracy = train_and_test(model, train, test, steps, args.seed)
        baseline_accuracy = train_and_test(baseline, train, test, steps, args.seed)
        seconds = time.perf_counter() - start
        print(f"| {name} | cluttered digits 24x24, 10 classes | {count(model):,} / {count(baseline):,} "
              f"(widths {width} / {baseline_width}) | {accuracy:.3f} | {baseline_accuracy:.3f} | "
              f"{steps} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
