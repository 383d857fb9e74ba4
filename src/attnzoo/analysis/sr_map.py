"""``analysis.sr_map``: the salient relevance (SR) map of "Beyond saliency" (Li et al.), a
context-aware saliency map computed on an LRP relevance map, so that it marks areas around the
foci of relevance instead of isolated pixels or tokens.

Steps, on a relevance map over N tokens or an (H, W) grid: (1) the positive relevance, scaled to
[0, 1]; (2) each location's descriptor is the window of scaled relevance around it (edges
replicated); (3) location i's dissimilarity to j is the descriptor distance shrunk by spatial
distance, d = d_value / (1 + c d_position) (positions scaled to [0, 1]), and its saliency is
1 - exp(-mean of its ``k`` smallest dissimilarities), averaged over the radii; (4) locations
within ``focus`` of the top saliency are foci, and each location's saliency is weighted by
1 - (its distance to the nearest focus, scaled to [0, 1]). The result is scaled to [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError, check_float, check_int


def _descriptors(r: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, *grid) scaled relevance -> (B, L, F) windows of side 2 radius + 1, edges replicated."""
    side = 2 * radius + 1
    if r.dim() == 2:
        padded = F.pad(r[:, None, :, None], (0, 0, radius, radius), mode="replicate")
        return F.unfold(padded, (side, 1)).transpose(1, 2)
    return F.unfold(F.pad(r[:, None], (radius,) * 4, mode="replicate"), side).transpose(1, 2)


def _positions(grid: tuple[int, ...], device) -> torch.Tensor:
    """(L, d) positions of a row-major grid, scaled by the largest side so distances stay in [0, sqrt(d)]."""
    axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float64, device=device) for s in grid], indexing="ij")
    pos = torch.stack([a.flatten() for a in axes], dim=-1)
    return pos / max(max(grid) - 1, 1)


def sr_map(relevance: torch.Tensor, *, k: int = 8, c: float = 3.0, radii: Sequence[int] = (1, 2),
           focus: float = 0.8) -> torch.Tensor:
    """SR map of ``relevance`` (B, N) over tokens or (B, H, W) over an image grid: same shape,
    values in [0, 1]. ``k``: neighbours compared (capped at L - 1); ``c``: the weight of spatial
    distance; ``radii``: descriptor window radii (one scale each); ``focus``: saliency fraction
    of the maximum that makes a focus."""
    if not isinstance(relevance, torch.Tensor) or relevance.dim() not in (2, 3) or not relevance.is_floating_point():
        raise InvalidArgumentError("relevance", "a floating (B, N) or (B, H, W) tensor", getattr(relevance, "shape", type(relevance)))
    check_float("c", c, low=0.0, high=float("inf"))
    check_float("focus", focus, low=0.0, high=1.0, low_open=True)
    if not radii:
        raise InvalidArgumentError("radii", "at least one window radius", radii)
    radii = [check_int("radii", r, minimum=0) for r in radii]
    grid = tuple(relevance.shape[1:])
    b, length = relevance.shape[0], relevance[0].numel()
    if length < 2:
        raise InvalidArgumentError("relevance", "at least two locations", grid)
    neighbours = min(check_int("k", k), length - 1)
    r = relevance.double().clamp(min=0.0)
    r = r / r.flatten(1).amax(-1).clamp_min(1e-30).reshape((b,) + (1,) * len(grid))
    pos = _positions(grid, r.device)
    spatial = torch.cdist(pos, pos)
    off_self = ~torch.eye(length, dtype=torch.bool, device=r.device)
    saliency = torch.zeros(b, length, dtype=torch.float64, device=r.device)
    for radius in radii:
        desc = _descriptors(r, radius)
        d = torch.cdist(desc, desc) / (1.0 + c * spatial)
        nearest = d.masked_fill(~off_self, float("inf")).topk(neighbours, dim=-1, largest=False).values
        saliency += 1.0 - torch.exp(-nearest.mean(-1))
    saliency /= len(radii)
    top = saliency.amax(-1, keepdim=True)
    foci = (saliency >= focus * top) & (top > 0)
    to_focus = spatial[None].masked_fill(~foci[:, None, :], float("inf")).amin(-1)  # (B, L)
    to_focus = torch.where(torch.isinf(to_focus), torch.zeros_like(to_focus), to_focus)
    weighted = saliency * (1.0 - to_focus / spatial.max().clamp_min(1e-30))
    weighted = weighted / weighted.amax(-1, keepdim=True).clamp_min(1e-30)
    return weighted.reshape(relevance.shape).to(relevance.dtype)
