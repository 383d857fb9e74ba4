"""Integrations with model libraries. transformers stays optional: it is imported on the first call."""

from __future__ import annotations


def patch(model, method=None, **options):
    """Run an attnzoo method inside a model: one built from ``attnzoo.nn.Attention`` (see
    :func:`attnzoo.integrations.attnzoo_nn.patch`) or a Hugging Face transformers model (see
    :func:`attnzoo.integrations.transformers.patch`)."""
    from .attnzoo_nn import is_attnzoo_model

    if is_attnzoo_model(model):
        from .attnzoo_nn import patch as _nn_patch

        return _nn_patch(model, method, **options)
    from .transformers import patch as _patch

    return _patch(model, method, **options)


def unpatch(model) -> bool:
    """Restore a patched model's own attention (either kind of model)."""
    from .attnzoo_nn import is_attnzoo_model

    if is_attnzoo_model(model):
        from .attnzoo_nn import unpatch as _nn_unpatch

        return _nn_unpatch(model)
    from .transformers import unpatch as _unpatch

    return _unpatch(model)
