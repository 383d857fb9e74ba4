"""``dit-digits`` samples judged by ``vit-digits``: dense, CLEAR and LinFusion attention, training-free, and a picture grid.

    python benchmarks/vision_dit_samples.py [--per-class 20] [--steps 25] [--guidance 2] [--radius 2 3] [--png docs/dit-digits-samples.png]

Sample accuracy: the fraction of the samples drawn for class c that vit-digits classifies as c (chance:
0.1), ``--per-class`` samples per digit, DDIM with ``--steps`` and classifier-free ``--guidance``, the same
starting noise for every method. CLEAR: the circular window of ``--radius`` on the 8 x 8 token grid
(the model has no text tokens); LinFusion: its generalised linear attention at its initial state (its
paper distils it; this is before that). The PNG (needs matplotlib, the ``[report]`` extra) shows four
samples of each digit per method.
"""

from __future__ import annotations

import argparse

import torch

import attnzoo
from attnzoo.trained import dit_digits


def picture(rows: list[tuple[str, torch.Tensor]], path: str) -> None:
    """One row of images (10 * k, 1, S, S) per method, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 1.15 * len(rows) + 0.2))
    for ax, (label, images) in zip(axes if len(rows) > 1 else [axes], rows):
        k = len(images) // 10
        strip = images.reshape(10, k, *images.shape[-2:]).permute(1, 2, 0, 3).reshape(k * images.shape[-2], -1)
        ax.imshow(strip.numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_axis_off()
        ax.set_title(label, fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--radius", type=float, nargs="+", default=[2.0, 3.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default=None, help="write the picture grid here")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    judge, _ = attnzoo.models.load("vit-digits")
    variants = [("dense", {})] + [("clear", {"radius": r}) for r in a.radius] + [("linfusion", {})]
    print(f"dit-digits sample accuracy judged by vit-digits: {a.per_class} samples per class, DDIM {a.steps} steps, "
          f"guidance {a.guidance}, seed {a.seed}")
    rows = []
    for name, config in variants:
        model, _ = dit_digits.load(method=name, **config)
        result = dit_digits.sample_accuracy(model, judge, per_class=a.per_class, steps=a.steps, guidance=a.guidance, seed=a.seed)
        label = name + "".join(f" {k}={v}" for k, v in config.items())
        print(f"{label:18s} accuracy {result['accuracy']:.3f}  per class " + " ".join(f"{x:.2f}" for x in result["per_class"]))
        if a.png:
            labels = torch.arange(10).repeat_interleave(4)
            images = model.sample(labels, steps=a.steps, guidance=a.guidance, generator=torch.Generator().manual_seed(a.seed))
            rows.append((f"{label}: sample accuracy {result['accuracy']:.2f}", images[:, 0]))
    if a.png:
        picture(rows, a.png)
        print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
