"""Agent Attention: a few pooled agent tokens, two softmax attention steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import check_int
from ...kernels.dense import masked_attention, sdpa
from ...method import Call, Method, MethodInfo
from ...registry import register


@dataclass
class AgentConfig:
    """``num_agents``: agent tokens n, the average-pooled queries (adaptive pooling over the
    sequence; fewer when N < n)."""

    num_agents: int = 64

    def __post_init__(self):
        self.num_agents = check_int("num_agents", self.num_agents)


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
    attention of cost O(N n D). The paper's agent bias and depth-wise convolution on V belong to
    the block and are not part of this operator. Non-causal. q (B, Hq, Nq, D), k/v (B, Hkv, Nk,
    D|Dv) -> (B, Hq, Nq, Dv)."""

    info = MethodInfo(
        name="agent", title="Agent Attention: On the Integration of Softmax and Linear Attention", arxiv="2312.08873",
        family=("linear",), causal=False, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(N n D)", memory="O(N n)", summary="pooled agent tokens: agent aggregation then agent broadcast (two softmaxes)",
    )
    Config = AgentConfig

    def _agents(self, call: Call) -> int:
        return min(self.config.num_agents, call.len_q)

    def _forward(self, q, k, v, call: Call):
        agents = F.adaptive_avg_pool1d(q.flatten(0, 1).transpose(1, 2), self._agents(call)).transpose(1, 2)
        agents = agents.unflatten(0, q.shape[:2])
        agent_values = sdpa(agents, k, v, causal=False, scale=call.scale)
        return sdpa(q, agents, agent_values, causal=False, scale=call.scale)

    def _reference(self, q, k, v, call: Call):
        pool = pooling_matrix(call.len_q, self._agents(call), q.device).to(q.dtype)
        agents = pool @ q
        agent_values = masked_attention(agents, k, v, None, scale=call.scale)
        return masked_attention(q, agents, agent_values, None, scale=call.scale)
