"""The one-call entry point."""

from __future__ import annotations

from typing import Any

import torch

from .method import Method
from .registry import get_method

_CACHE: dict[tuple, Method] = {}
_CACHE_SIZE = 64


_PLAIN = (bool, int, float, complex, str, bytes, type(None))


def _plain(value: Any) -> bool:
    """Whether ``value`` is a plain value (numbers, strings, None, and tuples / lists / dicts of
    them), whose repr identifies it; tensors, modules and other objects are not."""
    if isinstance(value, _PLAIN):
        return True
    if type(value) in (tuple, list):
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _key(method: str, config: dict[str, Any]):
    """Cache key of a configured method: only configs made of plain values are cached (two trained
    feature maps or two tensors can share a repr; such configs build a fresh method every call)."""
    if not isinstance(method, str) or not all(_plain(v) for v in config.values()):
        return None
    return (method, tuple(sorted((k, type(v).__name__, repr(v)) for k, v in config.items())))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str = "dense", *, causal: bool = False,
              scale: float | None = None, check_finite: bool = True, **config: Any) -> torch.Tensor:
    """Run attention ``method`` configured with ``config``; see :func:`attnzoo.get_method`.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv); ``check_finite``
    as in :meth:`attnzoo.Method.forward`. Methods configured with plain values (numbers,
    strings, tuples of them) are cached, so a pattern's block structure is built once per shape;
    options holding objects (a trained ``feature_map``, a tensor) build a new method on every call:
    keep the method from :func:`attnzoo.get_method` instead.
    """
    return _configured(method, config)(q, k, v, causal=causal, scale=scale, check_finite=check_finite)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str = "dense", *, causal: bool = False,
                       scale: float | None = None, check_finite: bool = True, **config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, Nq, Dv), lse (B, Hq, Nq)): attention ``method`` and each row's natural
    log-sum-exp over the keys it attends to, for merging results over disjoint key sets with
    :func:`attnzoo.merge_attention`; see :meth:`attnzoo.Method.forward_with_lse`."""
    return _configured(method, config).forward_with_lse(q, k, v, causal=causal, scale=scale, check_finite=check_finite)


def _configured(method: str, config: dict[str, Any]) -> Method:
    key = _key(method, config)
    m = _CACHE.get(key) if key is not None else None
    if m is None:
        m = get_method(method, **config)
        if key is not None:
            if len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = m
    return m
