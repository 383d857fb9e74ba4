"""Parameter counts of the vision attention modules (issue 19, group B) in the configurations their papers use.

    PYTHONPATH=src python benchmarks/modules_params_vision.py

One row per module: the module, its configuration, its parameter count, the paper's count
("not stated" where the paper gives none for the block alone) and, where the paper reports FLOPs
for the block, the FLOPs counted by torch.utils.flop_counter on the stated input.
"""

from __future__ import annotations

import torch

from attnzoo import modules

ROWS = [
    # (module, configuration, the paper's parameter count for the block)
    ("CrossScaleAttention", {"dim": 256, "num_heads": 4}, "not stated (CFANet: ResNet50 backbone + heads)"),
    ("SelectiveDenseAttention", {"channels": 256, "num_levels": 5, "refine_level": 0}, "not stated"),
    ("ClassSemanticsAttention", {"semantic_channels": 400, "channels": 256}, "not stated"),
    ("SentenceAttentionBlock", {"channels": 2048, "sentence_dim": 768}, "not stated"),
    ("TagQueryDecoder", {"num_tags": 4585, "num_descriptions": 51, "concept_dim": 512, "hidden_dim": 768, "num_heads": 4,
                             "num_layers": 2, "mlp_dim": 3072}, "not stated"),
]


def main() -> None:
    print(f"{'module':26s} {'params':>12s}  paper's params / configuration")
    for name, config, paper in ROWS:
        module = modules.create(name, **config)
        params = sum(p.numel() for p in module.parameters())
        buffers = sum(b.numel() for b in module.buffers())
        extra = f" (+{buffers:,} buffer entries: running statistics or frozen embeddings)" if buffers else ""
        print(f"{name:26s} {params:12,d}  {paper}; {config}{extra}")
    print("FLOPs: none of the five papers reports FLOPs for the block alone (TOPIQ reports whole-network FLOPs).")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
