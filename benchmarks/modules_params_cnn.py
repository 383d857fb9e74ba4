"""Parameter counts and FLOPs of group A's blocks in the configurations their papers use.

    python benchmarks/modules_params_cnn.py

One row per (module, configuration): parameters, the paper's module-level count where it states
one, and forward FLOPs for one image counted by torch.utils.flop_counter.FlopCounterMode (2 per
multiply-add; convolutions and matmuls only). The papers report parameters and FLOPs of whole
networks, not of the block alone, so the paper column reads "not stated". A second table checks
the two blocks that make up most of a network against the network totals the papers state:
the block's measured count times each stage's depth, plus the rest of the network counted
analytically (LayerNorms, an MLP of ratio 4, HorNet's layer scales, the 4x4 stem, 2x2
downsampling convolutions, a 1000-class head).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from attnzoo import modules

HORNET_ORDERS = {64: 2, 128: 3, 256: 4, 512: 5}  # g^n Conv order per stage width
# (module, config, input shape, where the paper uses it)
ROWS = [
    ("ULSAM", {"channels": 512, "num_subspaces": 4}, (1, 512, 14, 14), "MobileNet-V1 14x14 stage, g=4"),
    ("ULSAM", {"channels": 1024, "num_subspaces": 4}, (1, 1024, 7, 7), "MobileNet-V1 7x7 stage, g=4"),
    *[("ELA", {"channels": 256, "variant": v}, (1, 256, 56, 56), f"ELA-{v}, ResNet-50 stage 1 width") for v in "TBSL"],
    ("GuidedAttention", {"channels": 64}, (1, 64, 64, 64), "authors' code: 64 channels, 256x256 input / 4"),
    *[("GnConv", {"channels": c, "order": HORNET_ORDERS[c]}, (1, c, s, s), f"HorNet-T 7x7 stage {i + 1}")
      for i, (c, s) in enumerate([(64, 56), (128, 28), (256, 14), (512, 7)])],
    *[("FocalModulation", {"dim": c, "focal_level": level}, (1, s, s, c), f"FocalNet-T ({rf}) stage {i + 1}")
      for level, rf in ((2, "SRF"), (3, "LRF")) for i, (c, s) in enumerate([(96, 56), (192, 28), (384, 14), (768, 7)])],
]


def measure(name: str, config: dict, shape: tuple[int, ...]) -> tuple[int, int]:
    """(parameters, forward FLOPs) of the block ``name`` built with ``config`` on an input ``shape``."""
    module = modules.create(name, **config).eval()
    xs = [torch.randn(shape)] * (2 if name == "GuidedAttention" else 1)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*xs)
    return sum(p.numel() for p in module.parameters()), counter.get_total_flops()


# (network, block, config per stage, depths, widths, layer scale, paper's params in millions)
NETWORKS = [
    ("FocalNet-T (SRF)", "FocalModulation", lambda c: {"dim": c, "focal_level": 2}, (2, 2, 6, 2), (96, 192, 384, 768), False, 28.4),
    ("FocalNet-T (LRF)", "FocalModulation", lambda c: {"dim": c, "focal_level": 3}, (2, 2, 6, 2), (96, 192, 384, 768), False, 28.6),
    ("HorNet-T 7x7", "GnConv", lambda c: {"channels": c, "order": HORNET_ORDERS[c]}, (2, 3, 18, 2),
     (64, 128, 256, 512), True, 22.0),
]


def network_params(block: str, config, depths, widths, layer_scale: bool) -> int:
    """Parameters of a 4-stage network of ``block`` + MLP blocks (see the module docstring)."""
    total = 3 * widths[0] * 16 + widths[0] + 2 * widths[0]  # 4x4 stem and its LayerNorm
    for i, (depth, c) in enumerate(zip(depths, widths)):
        block_params = sum(p.numel() for p in modules.create(block, **config(c)).parameters())
        mlp = (c * 4 * c + 4 * c) + (4 * c * c + c)
        total += depth * (block_params + mlp + 2 * 2 * c + (2 * c if layer_scale else 0))
        if i + 1 < len(widths):
            total += 2 * c + 4 * c * widths[i + 1] + widths[i + 1]  # LayerNorm and 2x2 downsampling conv
    return total + 2 * widths[-1] + widths[-1] * 1000 + 1000  # final norm and head


def main() -> None:
    print("| module | config | input | used as | params | paper's params | GFLOPs (measured) | paper's FLOPs |")
    print("|---|---|---|---|---:|---|---:|---|")
    for name, config, shape, where in ROWS:
        params, flops = measure(name, config, shape)
        options = ", ".join(f"{k}={v}" for k, v in config.items())
        print(f"| {name} | {options} | {tuple(shape[1:])} | {where} | {params:,} | not stated | {flops / 1e9:.4f} | not stated |")
    print()
    print("| network | block | depths | widths | params (blocks measured, rest counted) | paper's params |")
    print("|---|---|---|---|---:|---:|")
    for network, block, config, depths, widths, layer_scale, paper in NETWORKS:
        total = network_params(block, config, depths, widths, layer_scale)
        print(f"| {network} | {block} | {depths} | {widths} | {total / 1e6:.2f}M | {paper}M |")


if __name__ == "__main__":
    main()
