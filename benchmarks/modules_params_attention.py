"""Parameter counts (and forward FLOPs) of group D's modules at the papers' configurations.

    python benchmarks/modules_params_attention.py

RCMHA: the authors' code (github.com/hermansh-id/rcmha, rcmha/config.py) trains d_model 128, 8 heads,
6 layers; the paper states no parameter count. Their layer learns a key embedding and bias per
relative offset (2 * 4096 rows); that count, from the code's shapes, is printed beside ours
(Transformer-XL's sinusoid form, pos_dim = d_model). AttentionExperts: BAM's seed models (590M-2B)
are not public; the rows use SmolLM2-135M's attention shape (dim 576, 9 query / 3 KV heads, head_dim
64), the model the tests upcycle. FLOPs: torch's FlopCounterMode over one forward at 128 tokens
(matrix products only); neither paper reports FLOPs for these layers.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from attnzoo.modules import create

TOKENS = 128


def rcmha_authors_code_params(d_model: int, heads: int, kernel: int = 3, max_offset: int = 4096) -> int:
    """The authors' RelativeMultiHeadAttention shapes: q, k without bias, v with bias, out with bias,
    three depth-wise convs over d_k channels, key embeddings (2P, H, d_k), key bias (2P, H), query bias (H, d_k)."""
    d_k = d_model // heads
    projections = 3 * d_model * d_model + d_model + d_model * d_model + d_model
    convs = 3 * (d_k * kernel + d_k)
    relative = 2 * max_offset * heads * d_k + 2 * max_offset * heads + heads * d_k
    return projections + convs + relative


def forward_flops(module: torch.nn.Module, dim: int) -> int:
    x = torch.randn(1, TOKENS, dim)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def rows():
    rcmha = create("RCMHA", dim=128, num_heads=8, qkv_bias=False)
    yield ("RCMHA", "dim 128, 8 heads, kernel 3, pos_dim 128", rcmha, 128,
           f"not stated (authors' code: {rcmha_authors_code_params(128, 8):,} with its per-offset tables)")
    smol = {"dim": 576, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "causal": True, "out_bias": False, "rope": 100000.0}
    for experts in (2, 4):
        for share_kv in (False, True):
            module = create("AttentionExperts", num_experts=experts, share_kv=share_kv, **smol)
            dense = 2 * 576 * 576 + 2 * 576 * 192  # SmolLM2's q, o (576 x 576) and k, v (576 x 192)
            yield ("AttentionExperts", f"SmolLM2-135M attention, {experts} experts, share_kv={share_kv}", module, 576,
                   (f"not stated (dense layer {dense:,}; {experts} x dense + router = "
                   f"{experts * dense + 576 * experts:,} without KV sharing)"))


def main() -> None:
    print(f"| module | config | params | paper's params | forward GFLOPs at {TOKENS} tokens |")
    print("|---|---|---|---|---|")
    for name, config, module, dim, paper in rows():
        params = sum(p.numel() for p in module.parameters())
        print(f"| {name} | {config} | {params:,} | {paper} | {forward_flops(module, dim) / 1e9:.3f} (not reported) |")


if __name__ == "__main__":
    main()
