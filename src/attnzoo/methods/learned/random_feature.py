"""The random-feature attention layer: many heads with frozen random query-key matrices and
trainable value matrices."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import InvalidArgumentError, check_float, check_int
from ...kernels.dense import causal_mask, repeat_kv
from ...kernels.linear import work_dtype
from ...method import Call, Method, MethodInfo
from ...registry import register

ACTIVATIONS = ("relu", "softmax")


@dataclass
class RandomFeatureConfig:
    """``num_heads``: random heads M; their query-key matrices ``W_m`` (D x D) have i.i.d.
    ``N(mean, std^2)`` entries drawn from ``seed`` and stay frozen; ``activation``: ``relu`` (the
    paper's ``sigma``, weights averaged over the visible keys) or ``softmax``; ``query_block``: queries
    per step of the fast path. The trainable value matrices are state, not config (see
    :class:`RandomFeature`)."""

    num_heads: int = 64
    mean: float = 0.0
    std: float = 1.0
    activation: str = "relu"
    seed: int = 0
    query_block: int = 128

    def __post_init__(self):
        self.num_heads = check_int("num_heads", self.num_heads)
        self.mean = check_float("mean", self.mean, low=-1e6, high=1e6)
        self.std = check_float("std", self.std, low=0.0, high=1e6)
        if self.activation not in ACTIVATIONS:
            raise InvalidArgumentError("activation", f"one of {ACTIVATIONS}", repr(self.activation))
        self.seed = check_int("seed", self.seed, minimum=0)
        self.query_block = check_int("query_block", self.query_block)


@register
class RandomFeature(Method):
    """Random-feature attention ("What can a Single Attention Layer Learn? A Study Through the
    Random Features Lens", arXiv 2307.11353): ``out_i = sum_m sum_j a^m_ij v_j V_m`` with frozen
    random query-key matrices, ``a^m_ij = sigma(q_i W_m k_j * scale) / n_i`` (relu, n_i visible
    keys) or ``softmax_j(q_i W_m k_j * scale)``, and trainable value matrices ``V_m``. The output is
    linear in the V_m, so ``fit_values`` trains them exactly (ridge regression). ``W_m = I`` (mean 1,
    std 0, one head, softmax) is exact attention. Cost O(M N^2 D): quadratic, computed a query block
    at a time. q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv) -> (B, Hq, Nq, Dv)."""

    info = MethodInfo(
        name="random_feature", title="What can a Single Attention Layer Learn? A Study Through the Random Features Lens",
        arxiv="2307.11353", family=("linear", "learned"), causal=True, non_causal=True, cross=True, gqa=True,
        training_free=False, time="O(M N^2 D)", memory="O(M b N) per query block b",
        summary="many heads with frozen random query-key matrices, trainable value matrices",
    )
    Config = RandomFeatureConfig

    def __init__(self, *, values: torch.Tensor | None = None, **config):
        """``values``: trained value matrices (M, Dv, Dv), kept as the parameter ``values``; None
        uses ``I / M`` (the plain average of the heads) until ``fit_values`` or ``materialize``."""
        super().__init__(**config)
        m = self.config.num_heads
        if values is not None and (not isinstance(values, torch.Tensor) or values.dim() != 3
                                   or values.shape[0] != m or values.shape[1] != values.shape[2]):
            raise InvalidArgumentError("values", f"None or a ({m}, Dv, Dv) tensor", getattr(values, "shape", type(values).__name__))
        self.values = None if values is None else nn.Parameter(values.detach().clone())
        self._weights: dict = {}

    def _average(self, dim_v: int) -> torch.Tensor:
        return torch.eye(dim_v).expand(self.config.num_heads, -1, -1) / self.config.num_heads

    def materialize(self, heads_q: int, heads_kv: int, dim: int, dim_v: int) -> None:
        if self.values is None:
            self.values = nn.Parameter(self._average(dim_v).clone())

    def query_key(self, dim: int) -> torch.Tensor:
        """(M, D, D) frozen query-key matrices, drawn once per head dim."""
        if dim not in self._weights:
            gen = torch.Generator().manual_seed(self.config.seed)
            noise = torch.randn(self.config.num_heads, dim, dim, generator=gen)
            self._weights[dim] = self.config.mean * torch.eye(dim) + self.config.std * noise
        return self._weights[dim]

    def value_matrices(self, dim_v: int, device, dtype) -> torch.Tensor:
        values = self.values
        if values is None:
            values = self._average(dim_v)
        elif values.shape[-1] != dim_v:
            raise InvalidArgumentError("values", f"({self.config.num_heads}, {dim_v}, {dim_v}) for value dim {dim_v}", tuple(values.shape))
        return values.to(device, dtype)

    def _head_outputs(self, q, k, v, call: Call, rows: slice) -> torch.Tensor:
        """(B, Hq, M, rows, Dv): every random head's attention output ``A_m v`` for queries ``rows``."""
        work = work_dtype(q)
        w = self.query_key(call.dim).to(q.device, work)
        k, v = repeat_kv(k, call.groups).to(work), repeat_kv(v, call.groups).to(work)
        qw = q[:, :, rows].to(work).unsqueeze(2) @ w  # (B, Hq, M, b, D)
        scores = (qw @ k.unsqueeze(2).transpose(-1, -2)) * call.scale
        allowed = causal_mask(call.len_q, call.len_kv, q.device)[rows] if call.causal else None
        if self.config.activation == "softmax":
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
        else:
            weights = torch.relu(scores)
            if allowed is not None:
                weights = weights * allowed
            visible = call.len_kv if allowed is None else allowed.sum(-1, keepdim=True).clamp_min(1)
            weights = weights / visible
        return weights @ v.unsqueeze(2)

    def _forward(self, q, k, v, call: Call):
        values = self.value_matrices(call.dim_v, q.device, work_dtype(q))
        outs = []
        for start in range(0, call.len_q, self.config.query_block):
            heads = self._head_outputs(q, k, v, call, slice(start, start + self.config.query_block))
            outs.append(torch.einsum("bhmnd,mde->bhne", heads, values))
        return torch.cat(outs, dim=2).to(q.dtype)

    def _reference(self, q, k, v, call: Call):
        values = self.value_matrices(call.dim_v, q.device, work_dtype(q))
        heads = self._head_outputs(q, k, v, call, slice(None))
        out = sum(heads[:, :, m] @ values[m] for m in range(self.config.num_heads))
        return out.to(q.dtype)

    def fit_values(self, q, k, v, target, *, causal: bool = False, scale: float | None = None, ridge: float = 1e-3) -> float:
        """Train the value matrices on (q, k, v) -> ``target`` (B, Hq, Nq, Dv) by ridge regression
        (the model is linear in them); sets the parameter ``values`` and returns the relative training error."""
        call = self._prepare(q, k, v, causal, scale)
        if not isinstance(target, torch.Tensor) or target.shape != (call.batch, call.heads_q, call.len_q, call.dim_v):
            raise InvalidArgumentError("target", f"a tensor of shape {(call.batch, call.heads_q, call.len_q, call.dim_v)}", getattr(target, "shape", target))
        block = self.config.query_block
        heads = torch.cat([self._head_outputs(q, k, v, call, slice(start, start + block)).double()
                           for start in range(0, call.len_q, block)], dim=3)  # (B, H, M, N, Dv), a query block at a time
        design = heads.permute(0, 1, 3, 2, 4).reshape(-1, self.config.num_heads * call.dim_v)
        goal = target.double().reshape(-1, call.dim_v)
        gram = design.T @ design + ridge * torch.eye(design.shape[1], dtype=torch.float64, device=design.device)
        solution = torch.linalg.solve(gram, design.T @ goal)
        self.values = nn.Parameter(solution.view(self.config.num_heads, call.dim_v, call.dim_v).float())
        return float((design @ solution - goal).norm() / goal.norm().clamp_min(1e-30))
