"""Attention building blocks as ``nn.Module`` classes (for CNNs, multiple-instance learning,
recommendation, tagging, ...): one file under ``attnzoo/modules/`` per block, registered by
``@register``; ``attnzoo.modules.create(name, **config)``, ``attnzoo list --kind modules``.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..registry import MODULES, ComponentInfo


class AttentionModule(nn.Module):
    """Base class of every registered block: set ``info``; the constructor's keyword arguments are
    the block's configuration (timm style)."""

    info: ClassVar[ComponentInfo]


MODULES.base = AttentionModule
register = MODULES.register
create = MODULES.create  # create(name, **config): a new block registered as name
list_modules = MODULES.infos  # every registered block's ComponentInfo, sorted by name


__all__ = ["AttentionModule", "ComponentInfo", "create", "list_modules", "register"]
