"""Agent Attention: a few pooled agent tokens, two softmax attention steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import InvalidArgumentError, check_int
from ...kernels.dense import masked_attention, sdpa
from ...method import Call, Method, MethodInfo
from ...registry import register


@dataclass
class AgentConfig:
    """``num_agents``: agent tokens n, the average-pooled queries; ``grid``: (H, W) of the query
    tokens (row-major, Nq = H W): the paper's 2-D adaptive pooling to p x p patches, p =
    int(sqrt(n)) (at most H, W); None pools the sequence in 1-D into n bins (fewer when Nq < n),
    attnzoo's form for token sequences."""

    num_agents: int = 64
    grid: tuple[int, int] | None = None

    def __post_init__(self):
        self.num_agents = check_int("num_agents", self.num_agents)
        if self.grid is not None:
            if not isinstance(self.grid, (tuple, list)) or len(self.grid) != 2:
                raise InvalidArgumentError("grid", "None or (H, W): agents pool 2-D patches", repr(self.grid))
            self.grid = tuple(check_int(f"grid[{i}]", g) for i, g in enumerate(self.grid))


def pooling_matrix(length: int, bins: int, device) -> torch.Tensor:
    """(bins, length) averaging matrix of adaptive average pooling: bin i averages tokens
    [floor(i N / n), ceil((i + 1) N / n))."""
    i = torch.arange(bins, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    start, stop = (i * length) // bins, -((-(i + 1) * length) // bins)
    inside = (j >= start) & (j < stop)
    return inside.double() / inside.sum(-1, keepdim=True)


@register
class Agent(Method):
    """Agent Attention ("Agent Attention: On the Integration of Softmax and Linear Attention", arXiv
    2312.08873): n agent tokens ``A = pool(Q)`` first aggregate the values, ``V_A = softmax(A K^T *
    scale) V``, then broadcast them, ``O = softmax(Q A^T * scale) V_A``; a generalised linear
    attention of cost O(N n D). With ``grid`` the agents pool p x p patches of the image grid as in
    the paper; without, the sequence is pooled in 1-D. The paper's agent bias and depth-wise
    convolution on V belong to the block and are not part of this operator. Non-causal. q (B, Hq,
    Nq, D), k/v (B, Hkv, Nk, D|Dv) -> (B, Hq, Nq, Dv)."""

    info = MethodInfo(
        name="agent", title="Agent Attention: On the Integration of Softmax and Linear Attention", arxiv="2312.08873",
        family=("linear",), causal=False, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(N n D)", memory="O(N n)", summary="pooled agent tokens: agent aggregation then agent broadcast (two softmaxes)",
    )
    Config = AgentConfig

    def check(self, call: Call) -> None:
        grid = self.config.grid
        if grid is not None and grid[0] * grid[1] != call.len_q:
            raise InvalidArgumentError("grid", f"(H, W) with H W = Nq = {call.len_q}", f"{grid} (product {grid[0] * grid[1]})")

    def _agent_shape(self, call: Call) -> tuple[int, ...]:
        """Agents per axis: (n,) of the 1-D pooling or (p_h, p_w) of the 2-D pooling."""
        if self.config.grid is None:
            return (min(self.config.num_agents, call.len_q),)
        side = math.isqrt(self.config.num_agents)
        return tuple(min(side, g) for g in self.config.grid)

    def _pool(self, q: torch.Tensor, call: Call) -> torch.Tensor:
        """(B, H, Nq, D) -> (B, H, n, D) agent tokens by adaptive average pooling of the queries."""
        shape, flat = self._agent_shape(call), q.flatten(0, 1).transpose(1, 2)  # (B H, D, Nq)
        if self.config.grid is None:
            pooled = F.adaptive_avg_pool1d(flat, shape)
        else:
            pooled = F.adaptive_avg_pool2d(flat.unflatten(2, self.config.grid), shape).flatten(2)
        return pooled.transpose(1, 2).unflatten(0, q.shape[:2])

    def _forward(self, q, k, v, call: Call):
        agents = self._pool(q, call)
        agent_values = sdpa(agents, k, v, causal=False, scale=call.scale)
        return sdpa(q, agents, agent_values, causal=False, scale=call.scale)

    def _reference(self, q, k, v, call: Call):
        sides, shape = self.config.grid or (call.len_q,), self._agent_shape(call)
        pool = pooling_matrix(sides[0], shape[0], q.device)
        for side, bins in zip(sides[1:], shape[1:]):  # row-major 2-D bins: the Kronecker product
            pool = torch.kron(pool, pooling_matrix(side, bins, q.device))
        agents = pool.to(q.dtype) @ q
        agent_values = masked_attention(agents, k, v, None, scale=call.scale)
        return masked_attention(q, agents, agent_values, None, scale=call.scale)
