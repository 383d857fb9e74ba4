"""PNG pictures of analysis results (matplotlib, the ``[report]`` extra): the attention of one
head, relevance over tokens, a map over an image grid, and deletion curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import AttnzooError, InvalidArgumentError


class PlotUnavailableError(AttnzooError):
    """matplotlib is not installed; the message names the extra."""


def pyplot():
    """matplotlib.pyplot on the Agg backend, or :class:`PlotUnavailableError`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotUnavailableError("PNG pictures need matplotlib: pip install 'attnzoo[report]'") from e
    return plt


def _array(name: str, values, ndim: int) -> np.ndarray:
    a = values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, dtype=np.float64)
    if a.ndim != ndim:
        raise InvalidArgumentError(name, f"a {ndim}-d array", a.shape)
    return a


def _labels(tokens: Sequence[str] | None, n: int) -> list[str]:
    if tokens is None:
        return [str(i) for i in range(n)]
    if len(tokens) != n:
        raise InvalidArgumentError("tokens", f"{n} tokens (one per position)", len(tokens))
    return [t.replace("Ġ", " ").replace("▁", " ") for t in tokens]


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def attention_png(probs, path, *, tokens: Sequence[str] | None = None, title: str = "") -> Path:
    """Heatmap of one head's (Nq, Nk) attention, queries down, keys across. Returns the path."""
    plt = pyplot()
    a = _array("probs", probs, 2)
    labels_k = _labels(tokens, a.shape[1])
    labels_q = labels_k[a.shape[1] - a.shape[0]:]  # queries are the last Nq positions
    size = 2 + 0.25 * max(a.shape)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(a, cmap="viridis", vmin=0.0)
    ax.set_xticks(range(a.shape[1]), labels_k, rotation=90, fontsize=7)
    ax.set_yticks(range(a.shape[0]), labels_q, fontsize=7)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.7)
    return _save(fig, plt, path)


def relevance_png(scores, path, *, tokens: Sequence[str] | None = None, title: str = "") -> Path:
    """Bars of per-token relevance (N,), positive red, negative blue. Returns the path."""
    plt = pyplot()
    s = _array("scores", scores, 1)
    fig, ax = plt.subplots(figsize=(2 + 0.3 * len(s), 3))
    ax.bar(range(len(s)), s, color=["#c0392b" if v >= 0 else "#2e86c1" for v in s])
    ax.set_xticks(range(len(s)), _labels(tokens, len(s)), rotation=90, fontsize=8)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_ylabel("relevance")
    ax.set_title(title)
    return _save(fig, plt, path)


def grid_png(values, path, *, image=None, title: str = "") -> Path:
    """A (H, W) map (e.g. rollout of the CLS token over the patch grid), over ``image`` (h, w, 3)
    in [0, 1] when given (the map is stretched over it). Returns the path."""
    plt = pyplot()
    v = _array("values", values, 2)
    fig, ax = plt.subplots(figsize=(4, 4))
    if image is not None:
        img = _array("image", image, 3)
        ax.imshow(img)
        ax.imshow(v, cmap="jet", alpha=0.5, extent=(0, img.shape[1], img.shape[0], 0), interpolation="bilinear")
    else:
        ax.imshow(v, cmap="viridis")
    ax.set_axis_off()
    ax.set_title(title)
    return _save(fig, plt, path)


def curves_png(curves: Mapping[str, Sequence[float]], path, *, xlabel: str = "fraction of tokens deleted",
               ylabel: str = "target logit", title: str = "") -> Path:
    """One line per named curve, sampled at evenly spaced x in [0, 1]. Returns the path."""
    plt = pyplot()
    if not curves:
        raise InvalidArgumentError("curves", "at least one named curve", curves)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, ys in curves.items():
        ys = np.asarray(ys, dtype=float)
        ax.plot(np.linspace(0.0, 1.0, len(ys)), ys, marker=".", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)
