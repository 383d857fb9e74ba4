"""Parameter counts (and FLOPs of one forward) of the group C modules at the configurations their papers use.

    python benchmarks/modules_params_sets.py

One row per module: module, config, params, the paper's params ("not stated" where the paper gives
none for the block alone), forward FLOPs (torch.utils.flop_counter) on the input described.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from attnzoo import modules


def _acmil_input():
    return (torch.randn(1, 1000, 384),), {}


def _dare_input():
    return (torch.tensor([0]), torch.zeros(1, 1000, dtype=torch.long), torch.ones(1, 1000, dtype=torch.bool)), \
        dict(target_categories=torch.tensor([0]), history_categories=torch.zeros(1, 1000, dtype=torch.long))


def _padapter_input():
    attention = torch.softmax(torch.randn(1, 12, 35, 16), dim=-1)
    return (torch.randn(1, 35, 768), torch.randn(1, 35, 768), torch.randn(1, 16, 768), attention), {}


def _dsl_input():
    return (torch.randn(1, 1024, 14, 14),), {}


def _oat_input():
    return (torch.randn(1, 84, 1440), torch.rand(1, 84, 2), torch.randn(1, 1440), torch.zeros(1, 10, dtype=torch.long)), {}


ROWS = [
    ("ACMIL", dict(in_dim=384, num_classes=2, hidden_dim=128, attention_dim=128, num_branches=5, top_k=10, mask_prob=0.6),
     "not stated", _acmil_input, "bag of 1000 ViT-S/16 features (official config: D_feat 384, D_inner 128)"),
    ("DecoupledTargetAttention", dict(num_items=1, num_categories=1, attention_dim=16, representation_dim=16, mlp_dims=(200, 80)),
     "not stated", _dare_input, "1000 behaviours; tables add 16 + 16 per item and per category"),
    ("PLaplacianAdapter", dict(dim=768, num_heads=12, reduction=8, p=1.25, mu=0.1),
     "not stated per adapter", _padapter_input, "BLIP-base text layer: 35 tokens x 16 pooled image tokens"),
    ("DynamicSubspaceLearner", dict(in_channels=1024, embedding_dim=128, num_learners=1),
     "not stated", _dsl_input, "ResNet-50 layer3 features 1024 x 14 x 14"),
    ("ObjectScanpathTransformer", dict(feature_dim=1440, dim=512, num_heads=4, num_encoder_layers=4, num_decoder_layers=4,
                                       ffn_dim=512, readout_heads=2),
     "not stated", _oat_input, "Amazon shelf: 84 objects, 10 fixations; readout_heads=2 and 1440-d crop features from the official code, the other dims assumed"),
]


def main() -> None:
    print("| module | config | params | paper's params | forward GFLOPs | input |")
    print("|---|---|---|---|---|---|")
    for name, config, paper, make_input, described in ROWS:
        torch.manual_seed(0)
        module = modules.create(name, **config).eval()
        params = sum(p.numel() for p in module.parameters())
        args, kwargs = make_input()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(*args, **kwargs)
        shown = ", ".join(f"{k}={v}" for k, v in config.items())
        print(f"| {name} | {shown} | {params:,} | {paper} | {counter.get_total_flops() / 1e9:.4f} | {described} |")


if __name__ == "__main__":
    main()
