"""`agent` (Agent Attention, arXiv 2312.08873, Eq. 3) against ``W = softmax(Q A^T scale)
softmax(A K^T scale)``, ``O = W V``, with the agents ``A = P Q`` average-pooled from the queries:
1-D bins of the sequence, or (the paper's) p x p patches of the (H, W) grid, p = int(sqrt(n))."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from fidelity.mutation import Mutant
from fidelity.quadratic import assert_matches, expand_heads, fidelity_tests

import attnzoo
from attnzoo.methods.linear import agent as agent_module


def bins(length: int, count: int) -> list[range]:
    """Adaptive pooling's bins: bin i covers [floor(i L / n), ceil((i + 1) L / n))."""
    return [range(i * length // count, math.ceil((i + 1) * length / count)) for i in range(count)]


def pooling(grid: tuple[int, ...], agents: int) -> torch.Tensor:
    """(agents, N) averaging matrix: 1-D bins, or p x p patches of a row-major 2-D grid."""
    if len(grid) == 1:
        patches = [list(b) for b in bins(grid[0], min(agents, grid[0]))]
    else:
        (rows, cols), side = grid, math.isqrt(agents)
        patches = [[r * cols + c for r in rb for c in cb]
                   for rb in bins(rows, min(side, rows)) for cb in bins(cols, min(side, cols))]
    pool = torch.zeros(len(patches), math.prod(grid), dtype=torch.float64)
    for a, members in enumerate(patches):
        pool[a, members] = 1.0 / len(members)
    return pool


def reference(q, k, v, *, causal, scale, grid, agents):
    assert not causal
    heads = q.shape[1]
    a = pooling(grid, agents) @ q
    weights = torch.softmax(q @ a.transpose(-1, -2) * scale, -1) @ torch.softmax(a @ expand_heads(k, heads).transpose(-1, -2) * scale, -1)
    return weights @ expand_heads(v, heads)


def check(gen):
    for grid, agents, shape in (((40,), 16, {}), ((5, 8), 9, {}), ((6, 4), 16, dict(Nq=24, Nk=40))):
        m = attnzoo.get_method("agent", num_agents=agents, grid=None if len(grid) == 1 else grid)
        ref = lambda q, k, v, grid=grid, agents=agents, **kw: reference(q, k, v, grid=grid, agents=agents, **kw)  # noqa: E731
        assert_matches(m, ref, gen, causal=False, label=f"agent grid={grid} n={agents}", **shape)


def row_strips(self, q, call):
    """The review's finding: agents pool the flattened sequence in 1-D even on a grid."""
    count = math.prod(self._agent_shape(call))
    return F.adaptive_avg_pool1d(q.flatten(0, 1).transpose(1, 2), count).transpose(1, 2).unflatten(0, q.shape[:2])


def without_scale(original):
    return lambda q, k, v, *, causal, scale, **kw: original(q, k, v, causal=causal, scale=1.0, **kw)


MUTANTS = [
    Mutant("agents-pool-row-strips", agent_module.Agent, "_pool", row_strips),
    Mutant("scale-dropped", agent_module, "sdpa", without_scale(agent_module.sdpa)),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
