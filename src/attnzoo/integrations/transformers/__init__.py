"""Run attnzoo methods inside Hugging Face transformers models, through transformers' own interfaces.

- :mod:`.adapter`: finding the attention modules of any model that uses transformers' attention
  interface, registering attnzoo there, :func:`patch` / :func:`unpatch`;
- :mod:`.plan`: what each layer runs (:class:`LayerPlan`, :class:`HeadGroup`), built from the
  user's specs;
- :mod:`.padding`: padded batches run each sequence's unpadded span;
- :mod:`.capture`: :func:`capture`, the one hook that records q, k, v and attention probabilities.
"""

from .adapter import (
    IMPLEMENTATION,
    Patch,
    attention_modules,
    current_patch,
    install,
    patch,
    token_layout,
    unpatch,
)
from .capture import AttentionRecord, Capture, capture
from .plan import PATTERNS_FORMAT, AttentionLayer, HeadGroup, LayerPlan, TokenLayout

__all__ = [
    "IMPLEMENTATION", "PATTERNS_FORMAT", "AttentionLayer", "AttentionRecord", "Capture", "HeadGroup", "LayerPlan", "Patch",
    "TokenLayout", "attention_modules", "capture", "current_patch", "install", "patch", "token_layout", "unpatch",
]
