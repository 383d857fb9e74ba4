"""KV-cache policies (the decode family): which keys and values a generating model keeps.

A policy is one file under ``attnzoo/cache/`` with one class registered by ``@register``:
``attnzoo.cache.get_policy(name, **config)``, ``attnzoo list --kind caches``.
"""

from __future__ import annotations

from ..registry import CACHES, ComponentInfo
from .base import CachePolicy

CACHES.base = CachePolicy
register = CACHES.register
get_policy = CACHES.create  # get_policy(name, **config): the policy registered as name, configured
list_policies = CACHES.infos  # every registered policy's ComponentInfo, sorted by name


__all__ = ["CachePolicy", "ComponentInfo", "get_policy", "list_policies", "register"]
