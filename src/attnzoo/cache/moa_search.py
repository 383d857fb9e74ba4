"""MoA's profiling search: an elastic span alpha_h + beta_h * N per head, chosen on calibration text
under an average-span budget, solved as a mixed-integer linear program (``scipy.optimize.milp``).

"MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression" (arXiv
2406.14909), section 4: profile each head's loss under every candidate rule at several input
lengths, then pick one rule per head minimising the summed loss subject to the density budget at
each length. A rule's loss is, as in the paper, the summed *attention influence* of the entries it
masks: with G = dL/dA the gradient of the model's mean next-token loss on a prefix of the
calibration text through head h's attention matrix A, masking entry (i, j) and renormalising its
row raises the loss by about A_ij (sum_k A_ik G_ik - G_ij) / (1 - A_ij) (first order); MoA sums the
magnitudes (``loss="gradient"``, one forward and backward per profiled length). ``loss="mass"``
uses the attention mass a rule drops instead (no backward pass). The result is an
``attnzoo-patterns/1`` config for ``attnzoo.patch(model, "auto", config=...)`` running the ``moa``
method with the chosen rules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError, check_float, check_int
from ..kernels.dense import attention_probabilities, causal_mask, repeat_kv, work_dtype

PATTERNS_FORMAT = "attnzoo-patterns/1"


def spans_of(rules: Sequence[tuple[float, float]], lengths: Sequence[int]) -> np.ndarray:
    """(R, L) span alpha + beta * n of each rule at each length n, at least 1 and at most n."""
    return np.array([[min(n, max(1, round(a + b * n))) for n in lengths] for a, b in rules], dtype=np.float64).reshape(len(rules), len(lengths))


def rule_spans(alphas: Sequence[float], betas: Sequence[float], lengths: Sequence[int]) -> tuple[list[tuple[float, float]], np.ndarray]:
    """The candidate rules (every (alpha, beta) pair) and their spans (R, L) at each length."""
    rules = [(float(a), float(b)) for a in alphas for b in betas]
    return rules, spans_of(rules, lengths)


def dropped_weight(weights: torch.Tensor, spans: np.ndarray, sinks: int) -> np.ndarray:
    """(H, R) weight a rule drops: for each head of ``weights`` (H, N, N) (non-negative, causal:
    zero above the diagonal) and each rule r keeping the keys < ``sinks`` and the latest ``spans[r]``
    keys of every query, the weight outside them, summed over the N queries."""
    heads, n, _ = weights.shape
    cumulative = torch.cumsum(weights.double(), dim=-1)  # C[h, i, j] = sum_{t <= j} W[h, i, t]
    rows = torch.arange(n)
    total = cumulative[:, rows, rows]
    on_sinks = cumulative[:, :, min(sinks, n) - 1] if sinks > 0 else torch.zeros(heads, n, dtype=torch.float64)
    out = np.zeros((heads, len(spans)))
    for r, span in enumerate(spans):
        start = torch.clamp(rows - int(span) + 1, min=sinks)  # first key of the span beyond the sinks
        before = torch.where(start > 0, cumulative[:, rows, (start - 1).clamp(min=0)], torch.zeros(()))
        window = torch.where(start <= rows, total - before, torch.zeros(()))
        out[:, r] = (total - on_sinks - window).sum(dim=1).numpy()
    return out


def dropped_mass(probs: torch.Tensor, spans: np.ndarray, lengths: Sequence[int], sinks: int) -> np.ndarray:
    """(H, R) attention mass a rule drops: for each head of ``probs`` (H, N, N) (causal softmax
    rows), each rule r with span ``spans[r, l]`` at length ``lengths[l]``, the mean over the first
    lengths[l] queries of 1 - (mass on keys < ``sinks`` or within the span), summed over lengths."""
    return sum(dropped_weight(probs[:, :n, :n], spans[:, l], sinks) / n for l, n in enumerate(lengths))


def influence(probs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """MoA's attention influence |A (sum_k A_ik G_ik - G) / (1 - A)| (same shape as ``probs`` A, the
    softmax rows, and ``grads`` G = dL/dA): the first-order loss rise of masking each entry alone
    and renormalising its row, in magnitude (arXiv 2406.14909, section 4)."""
    probs, grads = probs.double(), grads.double()
    rise = probs * ((probs * grads).sum(dim=-1, keepdim=True) - grads)
    return (rise / (1.0 - probs).clamp_min(torch.finfo(torch.float32).eps)).abs()


def attention_influence(model, ids: torch.Tensor):
    """Yield (layer, (Hq, N, N) :func:`influence` of each head's attention) for a transformers
    ``model`` on ``ids`` (1, N), L the mean next-token cross-entropy of ``ids``. One forward and one
    backward pass (to the attention outputs only: no parameter gradients); G = dL/dO v^T per head."""
    from ..integrations.transformers.capture import capture

    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        raise InvalidArgumentError("ids", "token ids of shape (1, N), N >= 2", tuple(ids.shape))
    with torch.enable_grad(), capture(model, output=True, device=None) as cap:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        loss = F.cross_entropy(logits[0, :-1].to(work_dtype(logits)), ids[0, 1:])
        records = {index: calls[0] for index, calls in sorted(cap.records.items())}
        del logits
        outputs = torch.autograd.grad(loss, [r.output for r in records.values()])
    for (index, record), grad_out in zip(records.items(), outputs):
        allowed = record.mask if record.mask is not None else causal_mask(ids.shape[1], ids.shape[1], ids.device)
        probs = attention_probabilities(record.q, record.k, scale=record.scale, mask=allowed)[0]
        v = repeat_kv(record.v, record.q.shape[1] // record.v.shape[1])[0]
        yield index, influence(probs, grad_out[0].to(v.dtype) @ v.transpose(-1, -2))


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


def profile_losses(model, ids: torch.Tensor, spans: np.ndarray, lengths: Sequence[int], sinks: int, loss: str) -> dict[int, np.ndarray]:
    """{layer: (Hq, R) loss of each head under each rule}, summed over the calibration sequences
    ``ids`` (S, N): the summed :func:`influence` of the entries a rule masks, one pass per sequence
    and profiled length (``loss="gradient"``), or the :func:`dropped_mass` of one pass per
    sequence (``"mass"``)."""
    from ..integrations.transformers.capture import capture

    losses: dict[int, np.ndarray] = {}

    def add(index: int, loss_of_rules: np.ndarray) -> None:
        losses[index] = losses.get(index, 0.0) + loss_of_rules

    for sequence in ids:
        if loss == "mass":
            with torch.no_grad(), capture(model, probs=True, qkv=False) as cap:
                model(input_ids=sequence[None], use_cache=False)
            for index, calls in sorted(cap.records.items()):
                add(index, dropped_mass(calls[0].probs[0], spans, lengths, sinks))
            continue
        for l, n in enumerate(lengths):
            for index, effect in attention_influence(model, sequence[None, :n]):
                add(index, dropped_weight(effect, spans[:, l], sinks))
    return losses


@dataclass
class MoAProfile:
    """What :func:`moa_profile` measured: ``rules`` (alpha, beta) of which the first ``candidates``
    are the search's grid (the rest, uniform spans alpha 0 at the densities asked for, are
    profiled only to be reported); the profiled ``lengths``; ``losses`` {layer: (Hq, R)}: each
    head's loss under each rule; ``sinks``, ``loss``: how."""

    rules: list[tuple[float, float]]
    candidates: int
    lengths: list[int]
    sinks: int
    loss: str
    losses: dict[int, np.ndarray]

    FORMAT: ClassVar[str] = "attnzoo-moa-profile/1"

    @property
    def spans(self) -> np.ndarray:
        """(R, L) each rule's span at each profiled length."""
        return spans_of(self.rules, self.lengths)

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile as JSON (profiling takes minutes; a later search reads it with :meth:`load`)."""
        data = {"format": self.FORMAT, "rules": self.rules, "candidates": self.candidates, "lengths": self.lengths, "sinks": self.sinks,
                "loss": self.loss, "losses": {str(i): v.tolist() for i, v in self.losses.items()}}
        temporary = f"{os.fspath(path)}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MoAProfile:
        """The profile :meth:`save` wrote to ``path``."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != cls.FORMAT:
            raise InvalidArgumentError("path", f"a {cls.FORMAT} file written by MoAProfile.save", data.get("format"))
        rules = [tuple(rule) for rule in data["rules"]]
        return cls(rules, data["candidates"], data["lengths"], data["sinks"], data["loss"],
                   {int(i): np.array(v) for i, v in data["losses"].items()})

    def uniform(self, density: float) -> int:
        """The index of the rule alpha 0, beta ``density`` (uniform spans) among :attr:`rules`."""
        for r, rule in enumerate(self.rules):
            if rule == (0.0, float(density)):
                return r
        raise InvalidArgumentError("density", "a density whose uniform spans (alpha 0, beta = density) the profile holds "
                                   f"(profiled: {sorted({b for a, b in self.rules if a == 0})}; pass densities= to moa_profile)",
                                   density)


def moa_profile(model, ids: torch.Tensor, *, lengths: Sequence[int] | None = None,
                alphas: Sequence[float] = (0, 32, 64, 128, 256), betas: Sequence[float] = (0.0, 0.0625, 0.125, 0.25, 0.5),
                sinks: int = 64, loss: str = "gradient", densities: Sequence[float] = ()) -> MoAProfile:
    """MoA's profiling of a transformers ``model`` on calibration ``ids`` (S, N), S sequences whose
    losses are summed (MoA profiles a set of calibration samples): every head's loss under every
    rule of the grid ``alphas`` x ``betas`` at the prefix ``lengths`` (default N/4, N/2, N).
    ``sinks``: leading keys every head keeps; ``loss``: what a rule costs a head, MoA's
    gradient-weighted ``"gradient"`` influence or the attention ``"mass"`` it drops (module
    docstring); ``densities``: the uniform spans (alpha 0, beta = density) to profile as well, for
    comparison, where the grid lacks them. One profile serves :func:`moa_search` at any density."""
    if loss not in ("gradient", "mass"):
        raise InvalidArgumentError("loss", "'gradient' or 'mass'", repr(loss))
    sinks = check_int("sinks", sinks, minimum=0)
    if ids.dim() != 2 or ids.shape[0] < 1:
        raise InvalidArgumentError("ids", "calibration token ids of shape (S, N): S sequences of N tokens", tuple(ids.shape))
    n = ids.shape[1]
    lengths = [n // 4, n // 2, n] if lengths is None else [check_int("lengths", x, minimum=2) for x in lengths]
    if max(lengths) > n:
        raise InvalidArgumentError("lengths", f"prefix lengths of at most the calibration length {n}", max(lengths))
    rules, _ = rule_spans(alphas, betas, lengths)
    extra = [(0.0, float(d)) for d in dict.fromkeys(check_float("densities", d, low=0.0, high=1.0, low_open=True) for d in densities)
             if (0.0, float(d)) not in rules]
    rules = rules + extra
    losses = profile_losses(model, ids, spans_of(rules, lengths), lengths, sinks, loss)
    return MoAProfile(rules, len(rules) - len(extra), lengths, sinks, loss, losses)


def moa_search(model, ids: torch.Tensor | None = None, *, density: float = 0.25, profile: MoAProfile | None = None,
               kv_groups: bool = False, scope: str = "layer", path: str | os.PathLike | None = None, **profiling) -> dict:
    """Search MoA's per-head elastic rules for a transformers ``model``: the rule of each head (of
    the ``profile``'s grid, or of :func:`moa_profile` run on calibration ``ids`` with the
    ``profiling`` options) minimising the summed loss, solved as a mixed-integer program.

    ``density``: the average span over heads at each profiled length is at most density * length;
    ``kv_groups``: one rule per KV head, shared by its query heads (their losses summed), so that
    the cache policy ``moa_cache``, which keeps each KV head's span, holds the budgeted keys;
    ``scope``: the budget holds in every ``"layer"``, or on average over all the ``"model"``'s
    heads (layers may then differ, as MoA's search allots it). Returns (and with ``path`` writes)
    the ``attnzoo-patterns/1`` config, whose ``search`` entry records the choice, its loss and that
    of uniform spans (alpha 0, beta ``density``) at equal budget."""
    from ..integrations.transformers.adapter import attention_modules

    density = check_float("density", density, low=0.0, high=1.0, low_open=True)
    if scope not in ("layer", "model"):
        raise InvalidArgumentError("scope", "'layer' or 'model'", repr(scope))
    if (profile is None) == (ids is None):
        raise InvalidArgumentError("ids, profile", "calibration ids or a moa_profile (one of them)",
                                   "both" if profile is not None else "neither")
    if profile is None:
        profile = moa_profile(model, ids, densities=[density], **profiling)
    elif profiling:
        raise InvalidArgumentError(", ".join(profiling), "no profiling options beside a profile (it was profiled with its own)",
                                   sorted(profiling))
    uniform = profile.uniform(density)
    rules, spans, lengths, grid = profile.rules, profile.spans, profile.lengths, profile.candidates
    kv_heads = {layer.index: layer.kv_heads for layer in attention_modules(model)}
    grouped = {}  # per layer: the grid rules' losses summed per rule's unit
    for index, per_head in profile.losses.items():
        group = per_head.shape[0] // kv_heads[index] if kv_groups else 1
        grouped[index] = per_head.reshape(-1, group, per_head.shape[1]).sum(axis=1)[:, :grid]
    picks = _choose(grouped, spans[:grid], np.array([density * x for x in lengths]), scope)
    layers, chosen, total, total_uniform = {}, {}, 0.0, 0.0
    for index, units in picks.items():
        losses = profile.losses[index]
        heads = units.repeat(losses.shape[0] // len(units))
        total += float(losses[np.arange(len(heads)), heads].sum())
        total_uniform += float(losses[:, uniform].sum())
        spec = {"method": "moa", "config": {"alpha": [rules[p][0] for p in heads], "beta": [rules[p][1] for p in heads],
                                            "sinks": profile.sinks}}
        layers[str(index)] = [spec] * len(heads)
        chosen[str(index)] = [list(rules[p]) for p in heads]
    config = {"format": PATTERNS_FORMAT, "layers": layers,
              "search": {"method": "moa", "density": density, "lengths": lengths, "sinks": profile.sinks, "kv_groups": kv_groups,
                         "scope": scope, "loss": profile.loss, "rules": chosen, "loss_total": total, "loss_total_uniform": total_uniform}}
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=1)
    return config
