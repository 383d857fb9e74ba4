"""MInference's offline per-head pattern search.

For every layer and query head of a causal LM, ``search_patterns`` captures the real attention
inputs on a sample text, scores candidate patterns (``streaming`` A-shape, ``vertical_slash`` with
block or single-token vertical lines, ``block_sparse``, each at a few budgets) by the recall of the exact attention mass they keep, and
picks for each head the candidate with the highest recall whose density on that head is within
``budget`` ("MInference 1.0", arXiv 2407.02490, Sec. 3.2: kernel-aware pattern search). The result
is an ``attnzoo-patterns/1`` file that ``attnzoo.patch(model, "auto", config=PATH)`` loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidArgumentError, check_float, check_int
from .kernels.dense import causal_mask, exact_probabilities
from .registry import get_method

FORMAT = "attnzoo-patterns/1"


def candidates(budget: float, tokens: int, block_size: int = 64) -> list[dict[str, Any]]:
    """Pattern specs whose density at ``tokens`` causal tokens is about ``budget`` or less."""
    blocks = -(-tokens // block_size)
    per_row = max(1, int(budget * (blocks + 1) / 2))  # key blocks per query block at this density
    keys = max(2, int(budget * (tokens + 1) / 2))  # keys per query
    specs = [
        {"method": "streaming", "config": {"sinks": min(64, keys // 2), "window": keys - min(64, keys // 2)}},
        {"method": "block_sparse", "config": {"top_k": per_row, "block_size": block_size}},
        {"method": "block_sparse", "config": {"top_k": per_row, "block_size": block_size, "estimator": "sampled_q"}},
    ]
    for vertical in sorted({1, max(1, per_row // 2), max(1, per_row - 1)}):
        slash = max(1, per_row - vertical)
        specs.append({"method": "vertical_slash", "config": {"vertical_blocks": vertical, "slash_blocks": slash, "block_size": block_size}})
    if per_row >= 3:  # the paper's single-token vertical lines: c columns cost about c / block_size blocks;
        # block 0 and the local slashes are always kept, so the columns get half of the blocks left
        specs.append({"method": "vertical_slash", "config": {"vertical_blocks": 1, "slash_blocks": per_row - per_row // 2,
                                                             "block_size": block_size, "vertical_columns": per_row // 2 * block_size // 2}})
    return specs


@torch.no_grad()
def head_scores(q, k, v, causal: bool, scale: float, specs: Sequence[dict[str, Any]], chunk: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per spec: (recall (Hq,), density (Hq,)) on one layer's q (1, Hq, N, D), k/v (1, Hkv, N, D)."""
    Nq, Nk = q.shape[2], k.shape[2]
    visible = causal_mask(Nq, Nk, q.device) if causal else torch.ones(Nq, Nk, dtype=torch.bool, device=q.device)
    area = visible.sum()
    supports = [get_method(s["method"], **s["config"]).support(q, k, v, causal=causal, scale=scale).expand(1, q.shape[1], Nq, Nk)
                for s in specs]
    recall = [torch.zeros(q.shape[1], dtype=torch.float64) for _ in specs]
    for rows, probs in exact_probabilities(q, k, causal=causal, scale=scale, chunk=chunk):
        for r, support in zip(recall, supports):
            r += (probs * support[:, :, rows]).sum(dim=(0, 2, 3)).double()
    return [(r / Nq, (s & visible).sum(dim=(0, 2, 3)).double() / float(area)) for r, s in zip(recall, supports)]


def search_patterns(model, tokenizer, text: str | None = None, budget: float = 0.1, *, max_tokens: int = 4096,
                    block_size: int = 64, path: str | os.PathLike | None = None, model_name: str | None = None,
                    show_progress: bool = True) -> dict[str, Any]:
    """Per layer and query head, the pattern (``streaming`` / ``vertical_slash`` / ``block_sparse``)
    and budget that keep the most attention mass at density <= ``budget`` on ``text`` (default: the
    English text of :mod:`attnzoo.eval`), as an ``attnzoo-patterns/1`` dict, written to ``path`` if given.

    A head where no candidate fits the budget gets its sparsest candidate. Each entry also records the
    measured ``recall`` and ``density`` of the chosen pattern. Needs the ``[models]`` extra.
    """
    from .eval import capture_qkv
    from .progress import progress

    budget = check_float("budget", budget, low=0.0, high=1.0, low_open=True)
    max_tokens = check_int("max_tokens", max_tokens, minimum=2 * block_size)
    block_size = check_int("block_size", block_size, minimum=2)
    captured = capture_qkv(model, tokenizer, text, max_tokens=max_tokens)
    if any(not c.causal for c in captured.values()):
        raise InvalidArgumentError("model", "a causal LM (MInference's patterns are for causal prefill)", "a bidirectional model")
    specs = candidates(budget, max_tokens, block_size)
    layers: dict[str, list[dict[str, Any]]] = {}
    for index, c in progress(sorted(captured.items()), "pattern search", show_progress):
        scores = head_scores(c.q, c.k, c.v, c.causal, c.scale, specs)
        recall = torch.stack([r for r, _ in scores])  # (specs, Hq)
        density = torch.stack([d for _, d in scores])
        fits = density <= budget
        best = torch.where(fits, recall, -1.0).argmax(0)
        best = torch.where(fits.any(0), best, density.argmin(0))
        layers[str(index)] = [
            {**specs[int(s)], "recall": round(float(recall[s, h]), 4), "density": round(float(density[s, h]), 4)}
            for h, s in enumerate(best.tolist())
        ]
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    result = {"format": FORMAT, "model": str(name), "budget": budget, "tokens": max_tokens, "layers": layers}
    if path is not None:
        Path(path).write_text(json.dumps(result, indent=1))
    return result
