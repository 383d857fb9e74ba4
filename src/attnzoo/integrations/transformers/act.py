"""ACT's search for the heads to calibrate (Yu et al., ICML 2024, arXiv 2406.15765), training-free.

ACT calibrates one head at a time on calibration data and keeps the heads whose calibration
improves the model there (its code: accuracy on a classification set; here: the next-token
negative log-likelihood of calibration text). The result is an ``attnzoo-patterns/1`` config
(``act`` on the chosen heads, ``dense`` on the others) that ``attnzoo.patch(model, "act",
config=...)`` loads.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ...errors import check_float
from ...eval.perplexity import window_nll
from ...methods.exact.act import ACT
from ...progress import progress
from .adapter import attention_modules, patch
from .plan import PATTERNS_FORMAT, layer_index


def _config(layer_heads: dict[int, list[int]], heads: int, act: dict[str, float]) -> dict[str, Any]:
    """The patterns config: ``act`` (options ``act``) on ``layer_heads``' heads, ``dense`` on the rest of those layers."""
    entry = {"method": "act", "config": act}
    return {"format": PATTERNS_FORMAT,
            "layers": {str(i): [entry if h in chosen else {"method": "dense"} for h in range(heads)] for i, chosen in layer_heads.items()}}


@torch.no_grad()
def act_search(model, ids: torch.Tensor, *, threshold: float = 0.1, beta: float = 0.4, layers: Iterable[int] | None = None,
               min_gain: float = 0.0, show_progress: bool = True) -> dict[str, Any]:
    """The ACT config for ``model`` from calibration tokens ``ids`` (1, N).

    Each head of ``layers`` (default all) is calibrated alone (``threshold``, ``beta``: the ``act``
    options); it is chosen when the summed NLL of ``ids`` drops by more than ``min_gain`` nats.
    The config records the baseline NLL and every head's gain under ``"act"``."""
    act = {"threshold": threshold, "beta": beta}
    ACT(**act)  # checks the options before the long search
    check_float("min_gain", min_gain, low=0.0, high=float("inf"))
    found = attention_modules(model)
    indices = [a.index for a in found]
    chosen_layers = indices if layers is None else [layer_index(i, indices, "layers") for i in layers]
    heads = found[0].heads
    baseline = window_nll(model, ids)
    gains: dict[str, list[float]] = {}
    for layer in progress(chosen_layers, "act search", show_progress):
        gains[str(layer)] = []
        for head in range(heads):
            with patch(model, "auto", config=_config({layer: [head]}, heads, act)):
                gains[str(layer)].append(baseline - window_nll(model, ids))
    return act_select({"act": {**act, "calibration_tokens": int(ids.shape[-1]), "baseline_nll": baseline, "gains": gains}}, min_gain)


def act_select(config: dict[str, Any], min_gain: float) -> dict[str, Any]:
    """``config`` (from :func:`act_search`) choosing the heads whose recorded gain exceeds ``min_gain`` nats."""
    min_gain = check_float("min_gain", min_gain, low=0.0, high=float("inf"))
    record = config["act"]
    gains = record["gains"]
    heads = len(next(iter(gains.values())))
    chosen = {int(layer): [h for h, gain in enumerate(values) if gain > min_gain] for layer, values in gains.items()}
    act = {"threshold": record["threshold"], "beta": record["beta"]}
    return {**_config({layer: hs for layer, hs in chosen.items() if hs}, heads, act), "act": {**record, "min_gain": min_gain}}
