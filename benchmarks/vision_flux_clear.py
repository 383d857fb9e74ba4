"""CLEAR against dense attention inside a tiny random-init FLUX transformer (diffusers), at 1K, 4K and 16K image tokens.

    python benchmarks/vision_flux_clear.py [--sides 32 64 128] [--radius 8] [--text 64] [--repeats 3] [--threads 1]

Two readings per size, each the median of ``--repeats`` rounds timing dense and CLEAR back to back
(ratios are what matter on a shared machine): the attention call alone at the shapes of the model's layers (joint text +
image tokens, the text tokens global), and the whole model forward patched with ``attnzoo.patch`` (one
double-stream and one single-stream block: attention dominates at these sizes). CLEAR's paper reports
6.3x over dense attention at 8K resolution on GPU.
"""

from __future__ import annotations

import argparse

import torch

import attnzoo
from vision_swaps import paired_speedup  # benchmarks/ is the script's folder

HEADS, HEAD_DIM = 4, 32


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
                                  num_attention_heads=HEADS, joint_attention_dim=64, pooled_projection_dim=64,
                                  axes_dims_rope=(8, 12, 12)).eval()


def flux_inputs(side: int, text: int, gen: torch.Generator) -> dict:
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros(side * side), rows.flatten(), cols.flatten()], 1).float()
    return dict(hidden_states=torch.randn(1, side * side, 4, generator=gen), encoder_hidden_states=torch.randn(1, text, 64, generator=gen),
                pooled_projections=torch.randn(1, 64, generator=gen), timestep=torch.tensor([0.5]), img_ids=img_ids,
                txt_ids=torch.zeros(text, 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", type=int, nargs="+", default=[32, 64, 128], help="image grid sides (tokens = side ** 2)")
    p.add_argument("--radius", type=float, default=8.0)
    p.add_argument("--text", type=int, default=64, help="text tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    model = tiny_flux()
    print(f"tiny FLUX ({HEADS} heads x {HEAD_DIM}, 1 double + 1 single block), {a.text} text tokens, CLEAR radius {a.radius}, "
          f"float32, {a.threads} thread(s), medians of {a.repeats}")
    print("image tokens | attention: dense ms, CLEAR ms, speed-up | model forward: dense ms, CLEAR ms, speed-up")
    for side in a.sides:
        n = a.text + side * side
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=gen) for _ in range(3))
        clear = attnzoo.get_method("clear", grid=(side, side), num_global=a.text, radius=a.radius)
        attn = paired_speedup(lambda: attnzoo.attention(q, k, v, "dense", check_finite=False),
                              lambda: clear(q, k, v, check_finite=False), a.repeats)
        x = flux_inputs(side, a.text, gen)

        def forward(name: str, **config):
            def run():
                with torch.no_grad(), attnzoo.patch(model, name, **config):
                    model(**x)
            return run

        whole = paired_speedup(forward("dense"), forward("clear", radius=a.radius), a.repeats)
        print(f"{side * side:12d} | {attn[0]:9.1f} {attn[1]:9.1f} {attn[2]:6.2f}x | {whole[0]:9.1f} {whole[1]:9.1f} {whole[2]:6.2f}x")


if __name__ == "__main__":
    main()
