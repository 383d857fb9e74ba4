"""Training a learnable feature map against a softmax teacher (Hedgehog's attention distillation)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import InvalidArgumentError, check_int
from ...kernels.dense import causal_mask, masked_softmax


def linear_weights(qf: torch.Tensor, kf: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Normalised linear-attention weights (B, H, Nq, Nk) from features (same heads)."""
    scores = qf @ kf.transpose(-1, -2)
    if mask is not None:
        scores = scores * mask
    return scores / scores.sum(-1, keepdim=True).clamp_min(1e-12)


def mimicry_loss(feature_map: nn.Module, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Hedgehog's distillation loss: the soft-label cross-entropy of the normalised linear-attention
    weights of ``feature_map`` against the teacher ``softmax(q k^T * scale)`` (under ``mask``, a bool
    (Nq, Nk) or None), averaged over queries; q, k (B, H, N, D) with the same heads."""
    teacher = masked_softmax((q @ k.transpose(-1, -2)) * scale, mask)
    qf, kf = feature_map(q, k)
    student = linear_weights(qf, kf, None if mask is None else mask.to(qf.dtype))
    return -(teacher * torch.log(student.clamp_min(1e-12))).sum(-1).mean()


def fit_to_softmax(feature_map: nn.Module, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True,
                   scale: float | None = None, steps: int = 200, lr: float = 1e-2, window: int = 256,
                   windows_per_step: int = 4, seed: int = 0) -> list[float]:
    """Train ``feature_map`` (``(q, k) -> (phi(q), phi(k))``) so that its normalised linear
    attention weights match the teacher's ``softmax(q k^T * scale)`` (Hedgehog's distillation:
    soft-label cross-entropy over keys, averaged over queries). q, k (B, H, N, D) are samples of one
    layer's queries and keys (same heads; expand GQA keys first), cut into windows of ``window``
    tokens (each window its own sequence, so a step costs O(window^2)); every step trains on
    ``windows_per_step`` windows drawn at random (``seed``). Returns the loss per step."""
    if q.shape != k.shape:
        raise InvalidArgumentError("k", f"the shape of q {tuple(q.shape)} (expand GQA heads first)", tuple(k.shape))
    steps, window = check_int("steps", steps), check_int("window", window)
    windows_per_step = check_int("windows_per_step", windows_per_step)
    window = min(window, q.shape[2])
    cut = lambda x: x.detach().float()[:, :, : x.shape[2] // window * window].unflatten(2, (-1, window)).transpose(1, 2).flatten(0, 1)  # noqa: E731
    q, k = cut(q), cut(k)  # (B * N / window, H, window, D)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = causal_mask(window, window, q.device) if causal else None
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(feature_map.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        pick = torch.randperm(q.shape[0], generator=gen)[:windows_per_step].to(q.device)
        loss = mimicry_loss(feature_map, q[pick], k[pick], mask, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
