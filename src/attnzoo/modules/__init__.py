"""Attention building blocks as ``nn.Module`` classes (for CNNs, multiple-instance learning,
recommendation, tagging, ...): one file under ``attnzoo/modules/`` per block, registered by
``@register``; ``attnzoo.modules.create(name, **config)``, ``attnzoo list --kind modules``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ..registry import MODULES, ComponentInfo


class AttentionModule(nn.Module):
    """Base class of every registered block: set ``info``; the constructor's keyword arguments are
    the block's configuration (timm style)."""

    info: ClassVar[ComponentInfo]


MODULES.base = AttentionModule
register = MODULES.register


def create(name: str, **config: Any) -> AttentionModule:
    """A new block registered as ``name``, built with ``config``."""
    return MODULES.get(name)(**config)


def list_modules() -> list[ComponentInfo]:
    """Every registered block's :class:`~attnzoo.registry.ComponentInfo`, sorted by name."""
    return MODULES.infos()


__all__ = ["AttentionModule", "ComponentInfo", "create", "list_modules", "register"]
