"""Integrations with model libraries. transformers stays optional: it is imported on the first call."""

from __future__ import annotations


def patch(model, method=None, **options):
    """Run an attnzoo method inside a Hugging Face transformers model; see
    :func:`attnzoo.integrations.transformers.patch`."""
    from .transformers import patch as _patch

    return _patch(model, method, **options)


def unpatch(model) -> bool:
    """Restore a patched model's own attention; see :func:`attnzoo.integrations.transformers.unpatch`."""
    from .transformers import unpatch as _unpatch

    return _unpatch(model)
