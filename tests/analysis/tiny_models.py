"""Tiny random-init transformers models for the analysis tests (no hub, no weights)."""

from __future__ import annotations

import torch

VOCAB, N = 97, 12
TEXT = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 32}


def tiny(family: str):
    """A two-layer llama (GQA, 2 KV heads) or bert model, seeded, in eval mode, float32."""
    import transformers as T

    torch.manual_seed(0)
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**TEXT, num_key_value_heads=2)).eval()
    return T.BertForMaskedLM(T.BertConfig(**TEXT)).eval()


def ids(rng, B: int = 1, n: int = N) -> torch.Tensor:
    """(B, n) random token ids."""
    return torch.randint(3, VOCAB, (B, n), generator=rng)
