"""``analysis.token_importance``: RSQ's attention-concentration score (Sung et al., "RSQ: Learning
from important tokens leads to better quantized LLMs", 2025): a token matters as much as the
attention it receives, summed over the queries, then averaged over heads and layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import check_layers


def token_importance(maps: Sequence[torch.Tensor], *, normalize: bool = True) -> torch.Tensor:
    """(B, Nk) attention concentration of per-layer probabilities ``maps`` (B?, H, Nq, Nk): the
    column sums (attention each key receives), averaged over heads and layers; with
    ``normalize`` each row sums to one (the column sums of a layer add up to Nq)."""
    layers = check_layers("maps", maps)
    score = torch.stack([m.double().sum(dim=-2).mean(dim=1) for m in layers]).mean(dim=0)
    return (score / score.sum(-1, keepdim=True) if normalize else score).float()
