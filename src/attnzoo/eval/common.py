"""Evaluation text present on every machine, model checks, JSON saving."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypeVar

import torch

from ..errors import InvalidArgumentError

T = TypeVar("T")

ENGLISH_SOURCE = "pydoc_data.topics (the Python language reference as English prose; ships with every CPython)"


def english_text() -> str:
    """About 450 KB of English: the topics of the Python language reference that CPython ships for
    ``help()`` (module ``pydoc_data.topics``), sorted by topic and joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def check_causal_lm(model) -> None:
    """Raise unless ``model`` is a language model with an output head (perplexity and passkey need one)."""
    get_head = getattr(model, "get_output_embeddings", None)
    if get_head is None or get_head() is None:
        raise InvalidArgumentError("model", "a causal language model with an output head (e.g. smollm2-135m)", type(model).__name__)


def save_json(path: str | os.PathLike, data: object) -> Path:
    """Write ``data`` as indented JSON atomically (a temporary file renamed over ``path``), so an
    interrupted run never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
