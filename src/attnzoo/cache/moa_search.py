"""MoA's profiling search: an elastic span alpha_h + beta_h * N per head, chosen on calibration text
under an average-span budget, solved as a mixed-integer linear program (``scipy.optimize.milp``).

"MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression" (arXiv
2406.14909), section 4: profile each head's loss under every candidate rule at several input
lengths, then pick one rule per head minimising the summed loss subject to the density budget at
each length. The paper estimates the loss with gradients of the model's loss through the
attention matrix; this search uses the attention mass each rule drops (1 - the softmax mass
inside the first ``sinks`` keys and the span), averaged over the queries of each profiled prefix:
no backward pass, same shape of problem. The result is an ``attnzoo-patterns/1`` config for
``attnzoo.patch(model, "auto", config=...)`` running the ``moa`` method with the chosen rules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InvalidArgumentError, check_float, check_int

PATTERNS_FORMAT = "attnzoo-patterns/1"


def rule_spans(alphas: Sequence[float], betas: Sequence[float], lengths: Sequence[int]) -> tuple[list[tuple[float, float]], np.ndarray]:
    """The candidate rules (every (alpha, beta) pair) and their spans (R, L) at each length, at
    least 1 and at most the length."""
    rules = [(float(a), float(b)) for a in alphas for b in betas]
    spans = np.array([[min(n, max(1, round(a + b * n))) for n in lengths] for a, b in rules], dtype=np.float64)
    return rules, spans


def dropped_mass(probs: torch.Tensor, spans: np.ndarray, lengths: Sequence[int], sinks: int) -> np.ndarray:
    """(H, R) attention mass a rule drops: for each head of ``probs`` (H, N, N) (causal softmax
    rows), each rule r with span ``spans[r, l]`` at length ``lengths[l]``, the mean over the first
    lengths[l] queries of 1 - (mass on keys < ``sinks`` or within the span), summed over lengths."""
    heads, n, _ = probs.shape
    cumulative = torch.cumsum(probs.double(), dim=-1)  # C[h, i, j] = sum_{t <= j} P[h, i, t]
    rows = torch.arange(n)
    on_sinks = cumulative[:, :, min(sinks, n) - 1] if sinks > 0 else torch.zeros(heads, n, dtype=torch.float64)
    out = np.zeros((heads, spans.shape[0]))
    for r in range(spans.shape[0]):
        for l, length in enumerate(lengths):
            i = rows[:length]
            start = torch.clamp(i - int(spans[r, l]) + 1, min=sinks)  # first key of the span beyond the sinks
            before = torch.where(start > 0, cumulative[:, i, (start - 1).clamp(min=0)], torch.zeros(()))
            window = torch.where(start <= i, cumulative[:, i, i] - before, torch.zeros(()))
            kept = on_sinks[:, :length] + window
            out[:, r] += (1.0 - kept).mean(dim=1).numpy()
    return out


def choose_rules(losses: np.ndarray, spans: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """(H,) index of one rule per head minimising sum_h losses[h, r_h] subject to, at each length
    l, sum_h spans[r_h, l] <= limits[l]; ``losses`` (H, R), ``spans`` (R, L), ``limits`` (L,).
    A mixed-integer linear program over x[h, r] in {0, 1} (``scipy.optimize.milp``)."""
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError as e:  # pragma: no cover - scipy is optional
        raise ImportError("MoA's search needs scipy: pip install 'attnzoo[search]' (or pip install scipy)") from e
    heads, rules = losses.shape
    one_each = np.kron(np.eye(heads), np.ones((1, rules)))  # row h sums x[h, :]
    budget = np.tile(spans.T, (1, heads))  # row l: spans[r, l] for every (h, r)
    result = milp(losses.reshape(-1), integrality=np.ones(heads * rules), bounds=Bounds(0, 1),
                  constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(budget, -np.inf, limits)])
    if not result.success:
        raise InvalidArgumentError("density", "a budget some choice of rules meets (the smallest spans exceed it)", result.message)
    return result.x.reshape(heads, rules).argmax(axis=1)


def _choose(grouped: dict[int, np.ndarray], spans: np.ndarray, density_spans: np.ndarray, scope: str) -> dict[int, np.ndarray]:
    """{layer: (units,) rule index per unit} from ``grouped`` {layer: (units, R) losses} under an
    average span of ``density_spans`` (L,) per unit, in each layer or over the whole model."""
    if scope == "layer":
        return {i: choose_rules(g, spans, density_spans * g.shape[0]) for i, g in grouped.items()}
    stacked = np.concatenate(list(grouped.values()))
    flat = choose_rules(stacked, spans, density_spans * stacked.shape[0])
    bounds = np.cumsum([0] + [g.shape[0] for g in grouped.values()])
    return {i: flat[start:end] for i, start, end in zip(grouped, bounds[:-1], bounds[1:])}


@torch.no_grad()
def moa_search(model, ids: torch.Tensor, *, density: float = 0.25, lengths: Sequence[int] | None = None,
               alphas: Sequence[float] = (0, 32, 64, 128, 256), betas: Sequence[float] = (0.0, 0.0625, 0.125, 0.25, 0.5),
               sinks: int = 64, kv_groups: bool = False, scope: str = "layer", path: str | os.PathLike | None = None) -> dict:
    """Search MoA's per-head elastic rules for a transformers ``model`` on calibration ``ids`` (1, N).

    ``density``: the average span over heads at each profiled length is at most density * length;
    ``lengths``: the prefix lengths profiled (default N/4, N/2, N); ``alphas``, ``betas``: the
    candidate rules' grid; ``sinks``: leading keys every head keeps; ``kv_groups``: one rule per
    KV head, shared by its query heads (their dropped mass summed), so that the cache policy
    ``moa_cache``, which keeps each KV head's span, holds the budgeted keys; ``scope``: the budget
    holds in every ``"layer"``, or on average over all the ``"model"``'s heads (layers may then
    differ, as MoA's search allots it). Returns (and with ``path``
    writes) the ``attnzoo-patterns/1`` config, whose ``search`` entry records the choice, the
    dropped attention mass and that of uniform spans (alpha 0, beta ``density``) at equal budget."""
    from ..integrations.transformers.adapter import attention_modules
    from ..integrations.transformers.capture import capture

    density = check_float("density", density, low=0.0, high=1.0, low_open=True)
    if scope not in ("layer", "model"):
        raise InvalidArgumentError("scope", "'layer' or 'model'", repr(scope))
    sinks = check_int("sinks", sinks, minimum=0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise InvalidArgumentError("ids", "calibration token ids of shape (1, N)", tuple(ids.shape))
    n = ids.shape[1]
    lengths = [n // 4, n // 2, n] if lengths is None else [check_int("lengths", x) for x in lengths]
    if max(lengths) > n:
        raise InvalidArgumentError("lengths", f"prefix lengths of at most the calibration length {n}", max(lengths))
    rules, spans = rule_spans(alphas, betas, lengths)
    uniform = rule_spans([0], [density], lengths)[1]
    with capture(model, probs=True) as cap:
        model(input_ids=ids)
    kv_heads = {layer.index: layer.kv_heads for layer in attention_modules(model)}
    losses, grouped = {}, {}  # per layer: (Hq, R + 1) dropped mass (the last rule: uniform spans), and summed per rule's unit
    for index, records in sorted(cap.records.items()):
        probs = records[0].probs[0]
        losses[index] = dropped_mass(probs, np.concatenate([spans, uniform]), lengths, sinks)
        group = probs.shape[0] // kv_heads[index] if kv_groups else 1
        grouped[index] = losses[index].reshape(-1, group, losses[index].shape[1]).sum(axis=1)[:, :-1]
    cap.records.clear()
    picks = _choose(grouped, spans, np.array([density * x for x in lengths]), scope)
    layers, chosen, dropped, dropped_uniform = {}, {}, 0.0, 0.0
    for index, units in picks.items():
        heads = units.repeat(losses[index].shape[0] // len(units))
        dropped += float(losses[index][np.arange(len(heads)), heads].sum())
        dropped_uniform += float(losses[index][:, -1].sum())
        spec = {"method": "moa", "config": {"alpha": [rules[p][0] for p in heads], "beta": [rules[p][1] for p in heads], "sinks": sinks}}
        layers[str(index)] = [spec] * len(heads)
        chosen[str(index)] = [list(rules[p]) for p in heads]
    config = {"format": PATTERNS_FORMAT, "layers": layers,
              "search": {"method": "moa", "density": density, "lengths": lengths, "sinks": sinks, "kv_groups": kv_groups, "scope": scope,
                         "rules": chosen,
                         "dropped_mass": dropped, "dropped_mass_uniform": dropped_uniform}}
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=1)
    return config
