"""Inputs with planted structure whose right answer is known, and the recall of the exact attention
mass a method keeps on the rows that have a planted target.

Every planted pair has logit ``STRENGTH`` (q . k scale), so a planted target holds nearly all of
its rows' attention mass and a method that finds it keeps recall near 1, one that misses it
keeps only what its other keys happen to hold."""

from __future__ import annotations

import torch

STRENGTH = 12.0  # logit of a planted (query, key) pair: e^12 against ~N unit-scale logits


def _unit(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def _amplitude(dim: int, strength: float) -> float:
    """a with a^2 / sqrt(dim) = strength: q = a u, k = a u gives that logit at scale dim^-0.5."""
    return (strength * dim ** 0.5) ** 0.5


def noise(gen: torch.Generator, n: int, dim: int, level: float = 0.5) -> torch.Tensor:
    """(1, 1, n, dim) Gaussian background tokens of standard deviation ``level``."""
    return torch.randn(1, 1, n, dim, generator=gen, dtype=torch.float64) * level


def far_blocks(gen: torch.Generator, n: int, dim: int, block: int, width: int = 1, first: int = 4, strength: float = STRENGTH):
    """Causal q, k (1, 1, n, dim) where every query block i >= ``first`` has one target key block
    t(i) in the first half of what it sees (far from the diagonal), its queries along a direction
    u_i that the keys of ``width`` consecutive blocks t(i) .. t(i) + width - 1 share (width > 1:
    attention locality, the neighbourhood of the strongest block is strong too; the strength
    falls by 1 logit per block). Returns q, k and the (n,) bool rows with a target."""
    q, k = noise(gen, n, dim), noise(gen, n, dim)
    a = _amplitude(dim, strength)
    rows = torch.zeros(n, dtype=torch.bool)
    nqb = n // block
    targets = torch.randint(0, 1 << 30, (nqb,), generator=gen)
    for i in range(first, nqb):
        t = int(targets[i]) % max(1, i // 2 - width + 1)
        u = _unit(gen, dim)
        q[0, 0, i * block : (i + 1) * block] += a * u
        for w in range(width):
            fade = ((strength - w) / strength) ** 0.5
            k[0, 0, (t + w) * block : (t + w + 1) * block] += a * fade * u
        rows[i * block : (i + 1) * block] = True
    return q, k, rows


def vertical_columns(gen: torch.Generator, n: int, dim: int, columns: list[int]):
    """Causal q, k where every query attends to the key tokens ``columns`` (shared direction);
    rows with a target: those that see the first column."""
    q, k = noise(gen, n, dim), noise(gen, n, dim)
    a = _amplitude(dim, STRENGTH)
    u = _unit(gen, dim)
    q[0, 0] += a * u
    k[0, 0, columns] += a * u
    return q, k, torch.arange(n) >= min(columns)


def question(gen: torch.Generator, n: int, dim: int, key: int, asking: int, common: int, common_strength: float = 6.0):
    """Causal q, k where only the last ``asking`` queries (a question at the end of a prompt) attend to
    key token ``key``, while every query also attends more weakly (logit ``common_strength``) to
    ``common`` shared key columns spread over the sequence, whose summed mass outvotes ``key`` in an
    estimate from queries spread over the sequence; rows with a target: the asking ones."""
    q, k = noise(gen, n, dim), noise(gen, n, dim)
    u, w = _unit(gen, 2, dim).unbind(0)
    w = torch.nn.functional.normalize(w - (w @ u) * u, dim=-1)  # the two directions do not interfere
    q[0, 0] += _amplitude(dim, common_strength) * w
    k[0, 0, torch.linspace(1, n - 1, common).long()] += _amplitude(dim, common_strength) * w
    a = _amplitude(dim, STRENGTH)
    q[0, 0, n - asking:] += a * u
    k[0, 0, key] += a * u
    return q, k, torch.arange(n) >= n - asking


def slash(gen: torch.Generator, n: int, dim: int, offset: int):
    """Causal q, k where query p attends to key p - ``offset`` (one random direction per pair);
    rows with a target: p >= offset."""
    q, k = noise(gen, n, dim), noise(gen, n, dim)
    a = _amplitude(dim, STRENGTH)
    u = _unit(gen, n - offset, dim)
    q[0, 0, offset:] += a * u
    k[0, 0, : n - offset] += a * u
    return q, k, torch.arange(n) >= offset


def clusters(gen: torch.Generator, n: int, dim: int, count: int, level: float = 0.5):
    """Non-causal q, k whose tokens fall in ``count`` equal random clusters (a shared direction
    each): a query attends to its cluster's keys. Every row has a target."""
    q, k = noise(gen, n, dim, level), noise(gen, n, dim, level)
    a = _amplitude(dim, STRENGTH)
    centres = _unit(gen, count, dim)
    of_query = torch.randperm(n, generator=gen) % count
    of_key = torch.randperm(n, generator=gen) % count
    q[0, 0] += a * centres[of_query]
    k[0, 0] += a * centres[of_key]
    return q, k, torch.ones(n, dtype=torch.bool)


def matching_regions(gen: torch.Generator, side: int, dim: int, n_win: int):
    """Non-causal q, k on a side x side grid cut into n_win x n_win regions; the queries of every
    region share a direction with the keys of one other random region (a 2-D match). Every row has
    a target."""
    n = side * side
    q, k = noise(gen, n, dim), noise(gen, n, dim)
    a = _amplitude(dim, STRENGTH)
    cell = side // n_win
    rows, cols = torch.arange(n) // side, torch.arange(n) % side
    region = (rows // cell) * n_win + cols // cell
    partner = torch.randperm(n_win * n_win, generator=gen)
    for r in range(n_win * n_win):
        u = _unit(gen, dim)
        q[0, 0, region == r] += a * u
        k[0, 0, region == int(partner[r])] += a * u
    return q, k, torch.ones(n, dtype=torch.bool)


def recall_on(q, k, support: torch.Tensor, rows: torch.Tensor, *, causal: bool) -> float:
    """Mean over the ``rows`` of the exact softmax mass (float64) that ``support`` keeps."""
    scale = q.shape[-1] ** -0.5
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    if causal:
        n_q, n_k = logits.shape[-2:]
        logits = logits.masked_fill(torch.ones(n_q, n_k, dtype=torch.bool).triu(n_k - n_q + 1), float("-inf"))
    probs = torch.softmax(logits, -1)
    kept = (probs * support.expand_as(probs)).sum(-1)
    return float(kept[..., rows].mean())
