"""``select_sources``: which calibration sources to distil on, by Lasso relevance to a target.

Active multi-task learning via Lasso: each candidate source and the target are summarised by a
feature vector (e.g. :func:`text_features`, the frozen model's mean hidden state per layer on that
text); the target's vector is regressed on the sources' with a non-negative Lasso, and the sources
with the largest coefficients are the ones whose data best explains the target.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError, check_float, check_int


@dataclass
class SourceSelection:
    """``weights`` {source: Lasso coefficient}; ``chosen``: the sources picked, best first."""

    weights: dict[str, float]
    chosen: list[str]


def _summary(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2) or x.numel() == 0:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidArgumentError(name, "a feature vector (d,) or a non-empty matrix of them (n, d)", got)
    return (x if x.dim() == 1 else x.mean(0)).double()


def nonnegative_lasso(design: torch.Tensor, target: torch.Tensor, alpha: float, sweeps: int = 500) -> torch.Tensor:
    """argmin_{w >= 0} ||target - design w||^2 / (2 d) + alpha ||w||_1 by cyclic coordinate descent;
    design (d, S), target (d,) -> w (S,)."""
    d, count = design.shape
    w = torch.zeros(count, dtype=design.dtype)
    norms = (design * design).sum(0) / d
    residual = target.clone()
    for _ in range(sweeps):
        largest = 0.0
        for j in range(count):
            if norms[j] == 0:
                continue
            rho = design[:, j] @ residual / d + norms[j] * w[j]
            new = max(0.0, float(rho) - alpha) / float(norms[j])
            step = new - float(w[j])
            if step:
                residual -= step * design[:, j]
                w[j] = new
                largest = max(largest, abs(step))
        if largest < 1e-10:
            break
    return w


def select_sources(sources: Mapping[str, torch.Tensor], target: torch.Tensor, *, count: int | None = None,
                   alpha: float = 1e-3, standardize: bool = True) -> SourceSelection:
    """Rank ``sources`` ({name: features (d,) or (n, d)}) by non-negative Lasso relevance to ``target``
    ((d,) or (m, d)); ``count``: how many to choose (default: every source with a positive weight);
    ``alpha``: the L1 strength; ``standardize``: centre and scale each feature over the sources first."""
    if not isinstance(sources, Mapping) or not sources:
        raise InvalidArgumentError("sources", "a non-empty mapping {name: features}", type(sources).__name__ if not isinstance(sources, Mapping) else "an empty one")
    names = list(sources)
    columns = [_summary(f"sources[{n!r}]", sources[n]) for n in names]
    goal = _summary("target", target)
    if any(c.shape != goal.shape for c in columns):
        raise InvalidArgumentError("sources", f"features of the target's dimension {goal.shape[0]}",
                                   {n: c.shape[0] for n, c in zip(names, columns)})
    alpha = check_float("alpha", alpha, low=0.0, high=float("inf"))
    count = None if count is None else check_int("count", count)
    design = torch.stack(columns, dim=1)  # (d, S)
    if standardize and len(names) > 1:  # each feature centred and scaled over the sources
        centre, spread = design.mean(1), design.std(1).clamp_min(1e-12)
        design, goal = (design - centre[:, None]) / spread[:, None], (goal - centre) / spread
    w = nonnegative_lasso(design, goal, alpha)
    weights = {n: float(w[j]) for j, n in enumerate(names)}
    ranking = [names[j] for j in torch.argsort(w, descending=True, stable=True).tolist()]
    chosen = ranking[:count] if count is not None else [n for n in ranking if weights[n] > 0]
    return SourceSelection(weights, chosen)


@torch.no_grad()
def text_features(model, tokenizer, text: str, *, seq_len: int = 256, windows: int = 4) -> torch.Tensor:
    """A transformers model's mean hidden state per layer over the first ``windows`` windows of
    ``seq_len`` tokens of ``text``, concatenated: ((layers + 1) * hidden,)."""
    from .harness import check_text

    ids = torch.tensor(tokenizer(check_text(text), add_special_tokens=False)["input_ids"], dtype=torch.long)
    windows = min(check_int("windows", windows), len(ids) // check_int("seq_len", seq_len))
    if windows == 0:
        raise InvalidArgumentError("text", f"at least seq_len={seq_len} tokens", f"{len(ids)} tokens")
    batch = ids[: windows * seq_len].view(windows, seq_len).to(next(model.parameters()).device)
    hidden = model(input_ids=batch, output_hidden_states=True).hidden_states
    return torch.cat([h.float().mean((0, 1)) for h in hidden]).cpu()
