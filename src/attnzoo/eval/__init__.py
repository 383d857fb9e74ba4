"""Quality of attention methods on real pretrained models, offline.

- :func:`perplexity`: next-token perplexity on real English text (:func:`english_text`, the Python
  language reference that ships with every CPython, unless you pass your own text);
- :func:`passkey`: a random key hidden at several depths in filler text, greedy decode, exact match;
- :func:`capture_qkv`: the real post-RoPE q, k, v of chosen layers;
- :func:`approximation`: a method's relative output error and recall of exact attention mass on them.

Results are dataclasses with ``as_dict()`` (plain JSON-serialisable dicts). Needs the ``[models]`` extra.
"""

from .approximation import (
    ApproximationResult,
    LayerApproximation,
    approximation,
    attention_recall,
    oracle_recall,
)
from .capture import CapturedQKV, capture_qkv
from .common import ENGLISH_SOURCE, english_text
from .passkey import PasskeyResult, PasskeyTrial, passkey, passkey_prompt
from .perplexity import PerplexityResult, perplexity, token_ids

__all__ = [
    "ApproximationResult", "CapturedQKV", "ENGLISH_SOURCE", "LayerApproximation", "PasskeyResult", "PasskeyTrial",
    "PerplexityResult", "approximation", "attention_recall", "capture_qkv", "english_text", "passkey", "passkey_prompt",
    "oracle_recall", "perplexity", "token_ids",
]
