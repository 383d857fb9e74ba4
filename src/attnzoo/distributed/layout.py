"""How a sequence is split across ranks: ``contiguous`` (rank r holds one run of tokens, lengths
may differ) or ``zigzag`` (the sequence cut into 2 W equal chunks, rank r holding chunks r and
2 W - 1 - r, so causal work is balanced)."""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: object) -> str:
    if layout not in LAYOUTS:
        raise InvalidArgumentError("layout", f"one of {LAYOUTS}", repr(layout))
    return layout


def positions(lengths: list[int], rank: int, layout: str, device=None) -> torch.Tensor:
    """Sequence positions (int64, ascending) of the tokens rank ``rank`` holds, given every rank's
    shard length."""
    check_layout(layout)
    if layout == "contiguous":
        start = sum(lengths[:rank])
        return torch.arange(start, start + lengths[rank], device=device)
    world = len(lengths)
    if len(set(lengths)) != 1 or lengths[0] % 2:
        raise InvalidArgumentError("layout", "'zigzag' with equal, even shard lengths on every rank (2 W equal chunks)"
                                   " or layout='contiguous'", f"shard lengths {lengths}")
    chunk = lengths[0] // 2
    first, second = rank * chunk, (2 * world - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk, device=device), torch.arange(second, second + chunk, device=device)])


def split_lengths(total: int, world: int) -> list[int]:
    """Contiguous shard lengths as even as possible (the first ``total % world`` ranks one longer)."""
    return [total // world + (r < total % world) for r in range(world)]


def shard(x: torch.Tensor, rank: int, world: int, *, layout: str = "contiguous", dim: int = 2,
          lengths: list[int] | None = None) -> torch.Tensor:
    """Rank ``rank``'s shard of ``x`` along ``dim`` (default the token axis of (B, H, N, D)):
    ``lengths`` (contiguous; default :func:`split_lengths`) or the zigzag chunks."""
    n = x.shape[dim]
    if layout == "zigzag":
        if n % (2 * world):
            raise InvalidArgumentError("layout", f"'zigzag' with N divisible by 2 * world = {2 * world}", f"N = {n}")
        lengths = [n // world] * world
    lengths = lengths or split_lengths(n, world)
    if sum(lengths) != n or len(lengths) != world:
        raise InvalidArgumentError("lengths", f"{world} shard lengths summing to N = {n}", lengths)
    return x.index_select(dim, positions(lengths, rank, layout, x.device))


def unshard(shards: list[torch.Tensor], *, layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """Every rank's shard (in rank order) -> the whole sequence along ``dim``."""
    lengths = [s.shape[dim] for s in shards]
    order = torch.cat([positions(lengths, r, layout) for r in range(len(shards))])
    joined = torch.cat(shards, dim=dim)
    return joined.index_select(dim, torch.argsort(order).to(joined.device))
