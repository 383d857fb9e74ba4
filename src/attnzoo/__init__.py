"""attnzoo: the attention mechanisms of a research literature behind one API.

    out = attnzoo.attention(q, k, v, "sliding_window", causal=True, window=512)

q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv), the layout of
``torch.nn.functional.scaled_dot_product_attention``; Hq a multiple of Hkv (grouped-query attention).
"""

from __future__ import annotations

from .api import attention, attention_with_lse
from .errors import (
    AttnzooError,
    InvalidArgumentError,
    UnknownNameError,
    UnsupportedError,
)
from .integrations import patch, unpatch
from .kernels.dense import merge_attention
from .method import CallStats, Method, MethodInfo
from .registry import get_method, list_methods, register

__version__ = "0.1.0"


def __getattr__(name: str):
    """``attnzoo.models`` and ``attnzoo.eval`` (they need the optional [models] extra) and the
    submodules ``nn``, ``cache``, ``modules`` import on first use."""
    if name in ("models", "eval", "nn", "cache", "modules"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    if name == "compress":  # KV-cache policies in generation (needs transformers)
        from .integrations.transformers.compress import compress

        return compress
    if name == "search_patterns":  # MInference's per-head pattern search (runs a model: [models] extra)
        from .search import search_patterns

        return search_patterns
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AttnzooError", "CallStats", "InvalidArgumentError", "Method", "MethodInfo", "UnknownNameError",
    "UnsupportedError", "attention", "attention_with_lse", "compress", "get_method", "merge_attention", "list_methods", "patch", "register", "search_patterns", "unpatch",
]
