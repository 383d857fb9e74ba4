"""KV-cache policies (the decode family): which keys and values a generating model keeps.

A policy is one file under ``attnzoo/cache/`` with one class registered by ``@register``:
``attnzoo.cache.get_policy(name, **config)``, ``attnzoo list --kind caches``.
"""

from __future__ import annotations

from typing import Any

from ..registry import CACHES, ComponentInfo
from .base import CachePolicy

CACHES.base = CachePolicy
register = CACHES.register


def get_policy(name: str, **config: Any) -> CachePolicy:
    """The cache policy registered as ``name``, configured with ``config``."""
    return CACHES.get(name)(**config)


def list_policies() -> list[ComponentInfo]:
    """Every registered cache policy's :class:`~attnzoo.registry.ComponentInfo`, sorted by name."""
    return CACHES.infos()


__all__ = ["CachePolicy", "ComponentInfo", "get_policy", "list_policies", "register"]
