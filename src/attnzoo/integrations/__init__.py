"""Integrations with model libraries. transformers and diffusers stay optional: each is imported on the first call."""

from __future__ import annotations


def _is_diffusers(model) -> bool:
    """Whether ``model`` is a diffusers model or pipeline, read from its classes without importing diffusers."""
    return any(cls.__module__.split(".")[0] == "diffusers" for cls in type(model).__mro__)


def patch(model, method=None, **options):
    """Run an attnzoo method inside a Hugging Face transformers model (see
    :func:`attnzoo.integrations.transformers.patch`) or a diffusers model or pipeline (see
    :func:`attnzoo.integrations.diffusers.patch`)."""
    if _is_diffusers(model):
        from .diffusers import patch as _patch_diffusers

        return _patch_diffusers(model, method, **options)
    from .transformers import patch as _patch

    return _patch(model, method, **options)


def unpatch(model) -> bool:
    """Restore a patched model's own attention; see :func:`attnzoo.integrations.transformers.unpatch`
    and :func:`attnzoo.integrations.diffusers.unpatch`."""
    if _is_diffusers(model):
        from .diffusers import unpatch as _unpatch_diffusers

        return _unpatch_diffusers(model)
    from .transformers import unpatch as _unpatch

    return _unpatch(model)
