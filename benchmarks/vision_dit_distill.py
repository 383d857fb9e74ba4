"""CLEAR and LinFusion distilled into ``dit-digits`` with ``attnzoo.distill``; sample accuracy (judged by ``vit-digits``)
before and after.

    python benchmarks/vision_dit_distill.py [--steps 300] [--batch-size 16] [--radius 2] [--per-class 20] [--out DIR]

The examples are the denoiser's own inputs: training (and validation) digits noised at uniform random
steps of the schedule, with their classes (a tenth as the null class, as in training). The recipes are
the harness's: ``clear`` trains copies of the attention layers running the circular window
(attention-output and block-output losses, CLEAR's), ``linfusion`` trains the feature maps of its
generalised linear attention (attention-weight, attention-output and block-output losses). Sampling
and judging as in ``benchmarks/vision_dit_samples.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import attnzoo
from attnzoo.distill import distill
from attnzoo.integrations import attnzoo_nn
from attnzoo.trained import digits, dit_digits


class Denoiser(nn.Module):
    """The DiT behind the harness's one-tensor interface: rows (B, S * S + 2) = noisy image, step, class -> noise."""

    def __init__(self, dit: dit_digits.DiTDigits):
        super().__init__()
        self.dit, self.grid = dit, dit.grid

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        size = self.dit.config.image_size
        x = batch[:, :-2].reshape(-1, 1, size, size)
        return self.dit(x, batch[:, -2].long(), batch[:, -1].long())


def examples(split: str, config: dit_digits.DiTConfig, gen: torch.Generator, repeats: int) -> torch.Tensor:
    """Rows of :class:`Denoiser`: each image of ``split`` noised ``repeats`` times at random steps."""
    images, labels = digits.load_split(split, config.image_size)
    images, labels = images.repeat(repeats, 1, 1, 1), labels.repeat(repeats).clone()
    labels[torch.rand(len(labels), generator=gen) < 0.1] = config.num_classes
    t = torch.randint(0, config.timesteps, (len(images),), generator=gen)
    a = dit_digits.alpha_bar(t, config.timesteps)[:, None, None, None]
    noisy = a.sqrt() * (images * 2 - 1) + (1 - a).sqrt() * torch.randn(images.shape, generator=gen)
    return torch.cat([noisy.flatten(1), t[:, None].float(), labels[:, None].float()], dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--radius", type=float, default=2.0)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--out", default=None, help="checkpoint folders go here (default: a temporary folder)")
    p.add_argument("--weights", default=str(dit_digits.WEIGHTS), help="the dit-digits weights folder")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    judge, _ = attnzoo.models.load("vit-digits")
    dense, _ = dit_digits.load(folder=a.weights)
    gen = torch.Generator().manual_seed(0)
    train, val = examples("train", dense.config, gen, 2), examples("val", dense.config, gen, 1)
    score = lambda model: dit_digits.sample_accuracy(model, judge, per_class=a.per_class, steps=a.sample_steps)["accuracy"]  # noqa: E731
    print(f"dit-digits sample accuracy judged by vit-digits ({a.per_class} per class, DDIM {a.sample_steps} steps); "
          f"distillation: {a.steps} steps of batch {a.batch_size}, {len(train)} noised training examples")
    print(f"dense                 {score(dense):.3f}")
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="dit_distill_"))
    for recipe, config in (("clear", {"radius": a.radius}), ("linfusion", {})):
        before, _ = dit_digits.load(folder=a.weights, method=recipe, **config)
        model = Denoiser(dit_digits.load(folder=a.weights)[0])
        start = time.perf_counter()
        run = distill(model, recipe, train, out / recipe, steps=a.steps, val=val, batch_size=a.batch_size, progress=False, **config)
        minutes = (time.perf_counter() - start) / 60
        with attnzoo_nn.install(model, run.methods):
            after = score(model.dit)
        validation = ", ".join(f"{k} {v:.4g}" for k, v in run.metrics[-1].items() if k.startswith("val_"))
        label = recipe + "".join(f" {k}={v}" for k, v in config.items())
        print(f"{label:20s}  training-free {score(before):.3f}  distilled {after:.3f}  ({run.steps} steps, {minutes:.1f} min; "
              f"held-out {validation})")


if __name__ == "__main__":
    main()
