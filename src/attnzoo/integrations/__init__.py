"""Integrations with model libraries. transformers and diffusers stay optional: each is imported on the first call."""

from __future__ import annotations


def _is_diffusers(model) -> bool:
    """Whether ``model`` is a diffusers model or pipeline, read from its classes without importing diffusers."""
    return any(cls.__module__.split(".")[0] == "diffusers" for cls in type(model).__mro__)


def patch(model, method=None, **options):
    """Run an attnzoo method inside a model: a diffusers model or pipeline (see
    :func:`attnzoo.integrations.diffusers.patch`), one built from ``attnzoo.nn.Attention`` (see
    :func:`attnzoo.integrations.attnzoo_nn.patch`) or a Hugging Face transformers model (see
    :func:`attnzoo.integrations.transformers.patch`)."""
    if _is_diffusers(model):
        from .diffusers import patch as _patch_diffusers

        return _patch_diffusers(model, method, **options)
    from .attnzoo_nn import is_attnzoo_model

    if is_attnzoo_model(model):
        from .attnzoo_nn import patch as _nn_patch

        return _nn_patch(model, method, **options)
    from .transformers import patch as _patch

    return _patch(model, method, **options)


def unpatch(model) -> bool:
    """Restore a patched model's own attention (any of the three kinds of model)."""
    if _is_diffusers(model):
        from .diffusers import unpatch as _unpatch_diffusers

        return _unpatch_diffusers(model)
    from .attnzoo_nn import is_attnzoo_model

    if is_attnzoo_model(model):
        from .attnzoo_nn import unpatch as _nn_unpatch

        return _nn_unpatch(model)
    from .transformers import unpatch as _unpatch

    return _unpatch(model)
