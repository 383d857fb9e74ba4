"""The one-call entry point."""

from __future__ import annotations

from typing import Any

import torch

from .method import Method
from .registry import get_method

_CACHE: dict[tuple, Method] = {}
_CACHE_SIZE = 64


def _key(method: str, config: dict[str, Any]):
    try:
        key = (method, tuple(sorted((k, repr(v)) for k, v in config.items())))
        hash(key)
        return key
    except TypeError:
        return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str = "dense", *, causal: bool = False,
              scale: float | None = None, **config: Any) -> torch.Tensor:
    """Run attention ``method`` configured with ``config``; see :func:`attnzoo.get_method`.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv). Configured methods
    are cached, so a pattern's block structure is built once per shape.
    """
    key = _key(method, config)
    m = _CACHE.get(key) if key is not None else None
    if m is None:
        m = get_method(method, **config)
        if key is not None:
            if len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = m
    return m(q, k, v, causal=causal, scale=scale)
