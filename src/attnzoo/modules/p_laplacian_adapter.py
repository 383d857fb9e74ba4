"""p-adapter: p-Laplacian message passing on an attention layer's attention graph, as an adapter."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError, check_float, check_int
from ..kernels.dense import work_dtype
from ..registry import ComponentInfo
from . import AttentionModule, register


@register
class PLaplacianAdapter(AttentionModule):
    """p-adapter (Wu et al., "p-Laplacian Adaptation for Generative Pre-trained Vision-Language
    Models", arXiv 2312.10613): hidden (B, Nq, dim), queries (B, Nq, dim), values (B, Nk, dim),
    attention (B, H, Nq, Nk) -> hidden (B, Nq, dim).

    The frozen attention layer is read as a bipartite graph: query tokens and value tokens are
    nodes (their projected features, reduced to ``dim // reduction`` channels and split into H
    heads), the attention probabilities are the edge weights. One p-Laplacian message-passing step
    re-weights each edge by the distance of its end points, ``w_ij = a_ij (a_ij |q_i - v_j|^2 +
    eps)^((p - 2) / 2)``, re-normalises ``alpha_i = 1 / (sum_j w_ij + 2 mu / p)`` and aggregates
    ``m_i = alpha_i sum_j w_ij v_j + (2 mu / p) alpha_i q_i``: p < 2 favours close (homophilic)
    neighbours; p = 2 and mu = 0 is the attention itself, ``sum_j a_ij v_j``. The message is gated by
    GELU(W_g hidden), projected back to ``dim`` and added to ``hidden`` (the attention output after
    its output projection). ``p`` is learnable (``learnable_p``); mu = mu0 (2 + tanh(t)) with a
    learned t starting at 0. The attention weights come from the host layer, not from an attnzoo
    executor (the adapter needs the probabilities). Absent: the host VLM (BLIP) and its frozen
    layers, the FFN adapters the paper trains beside it, and the official code's pooling of image
    tokens to a fixed count.
    """

    info = ComponentInfo(
        name="PLaplacianAdapter",
        title="p-Laplacian Adaptation for Generative Pre-trained Vision-Language Models",
        arxiv="2312.10613",
        family=("module",),
        summary="adapter after attention: p-Laplacian message passing on the query/value attention graph",
    )

    def __init__(self, dim: int, num_heads: int, *, reduction: int = 8, p: float = 1.25, mu: float = 0.1,
                 learnable_p: bool = True, eps: float = 1e-8):
        super().__init__()
        self.dim, self.num_heads = check_int("dim", dim), check_int("num_heads", num_heads)
        reduction = check_int("reduction", reduction)
        if self.dim % reduction or (self.dim // reduction) % self.num_heads:
            raise InvalidArgumentError("reduction", f"a divisor of dim={self.dim} leaving a multiple of num_heads="
                                       f"{self.num_heads} channels", reduction)
        self.inner = self.dim // reduction
        p = check_float("p", p, low=0.0, high=16.0, low_open=True)
        self.mu0 = check_float("mu", mu, low=0.0, high=1e3)
        self.eps = check_float("eps", eps, low=0.0, high=1.0, low_open=True)
        if not isinstance(learnable_p, bool):
            raise InvalidArgumentError("learnable_p", "a bool", repr(learnable_p))
        if learnable_p:
            self.p = nn.Parameter(torch.tensor(p))
        else:
            self.register_buffer("p", torch.tensor(p))
        self.mu_logit = nn.Parameter(torch.zeros(()))
        self.down = nn.Linear(self.dim, self.inner)
        self.gate = nn.Linear(self.dim, self.inner)
        self.up = nn.Linear(self.inner, self.dim)
        self.act = nn.GELU()

    def forward(self, hidden: torch.Tensor, queries: torch.Tensor, values: torch.Tensor,
                attention: torch.Tensor) -> torch.Tensor:
        """hidden, queries (B, Nq, dim), values (B, Nk, dim), attention (B, H, Nq, Nk) -> (B, Nq, dim)."""
        self._check(hidden, queries, values, attention)
        message = self.message(self._heads(self.down(queries)), self._heads(self.down(values)), attention)
        message = message.transpose(1, 2).flatten(2)  # (B, Nq, inner)
        return hidden + self.up(self.act(self.gate(hidden)) * message)

    def message(self, q: torch.Tensor, v: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """One p-Laplacian step: q (B, H, Nq, d), v (B, H, Nk, d), attention (B, H, Nq, Nk) -> (B, H, Nq, d)."""
        work = work_dtype(q)
        q, v, a = q.to(work), v.to(work), attention.to(work)
        sq_dist = ((q * q).sum(-1, keepdim=True) + (v * v).sum(-1)[..., None, :] - 2 * q @ v.transpose(-1, -2)).clamp_min(0)
        p = self.p.to(work)
        weight = a * (a * sq_dist + self.eps) ** ((p - 2) / 2)
        self_weight = 2 * self.mu0 * (2 + torch.tanh(self.mu_logit.to(work))) / p
        alpha = 1.0 / (weight.sum(-1, keepdim=True) + self_weight)
        return (alpha * (weight @ v + self_weight * q)).to(attention.dtype if attention.is_floating_point() else q.dtype)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.inner // self.num_heads)).transpose(1, 2)

    def _check(self, hidden, queries, values, attention) -> None:
        def shape_of(t):
            return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__

        for name, t in (("hidden", hidden), ("queries", queries), ("values", values)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != self.dim:
                raise InvalidArgumentError(name, f"a tensor (B, N, {self.dim})", shape_of(t))
        if queries.shape != hidden.shape:
            raise InvalidArgumentError("queries", f"shape {tuple(hidden.shape)} (one per token of hidden)", shape_of(queries))
        if values.shape[0] != hidden.shape[0] or values.shape[1] == 0:
            raise InvalidArgumentError("values", f"a tensor ({hidden.shape[0]}, Nk >= 1, {self.dim})", shape_of(values))
        expected = (hidden.shape[0], self.num_heads, hidden.shape[1], values.shape[1])
        if not isinstance(attention, torch.Tensor) or tuple(attention.shape) != expected:
            raise InvalidArgumentError("attention", f"probabilities of shape {expected} (B, H, Nq, Nk)", shape_of(attention))
