"""The default budget of the block-selection methods (``hip``, ``block_sparse``, ``vertical_slash``):
a density target that falls as the number of keys N grows, and a block size that suits N.

At a call with N keys:

- block size b: the power of two nearest N / 256, within [16, 128] (16 up to 4K keys, 32 at 8K,
  64 at 16K, 128 from 32K); ``hip`` and ``block_sparse``: the largest power of two not above
  N / 256 (16 below 8K, so 16 at 7K where the nearest, 32, loses SmolLM2's far passkeys; the same
  at 4K, 8K, 16K, ...).
  Small blocks keep what short texts attend to (on SmolLM2 at 4K, 16-token blocks keep 0.88 of
  the attention mass at 10% density where 64-token blocks keep 0.80: ``eval.oracle_recall``); long
  inputs need larger blocks, or the block executor's per-block overhead and the selection's
  per-block scoring outgrow the attention they save.
- density target d = min(1, 0.15 * 4096 / N): a fixed number of attended keys per query whatever N,
  as HiP keeps a fixed k and MInference fixed vertical and slash counts; 15% at 4K, 3.75% at 16K,
  0.94% at 64K (density is measured against the dense area, the causal triangle when causal).
- estimating queries (``vertical_slash``'s ``last_q``): max(64, 2^20 / N), so the estimate reads a
  fixed 2^20 logits per head (256 queries at 4K, 64 at 16K and beyond, MInference's last 64).
- key blocks per query block K: the most for which the block support stays within d of the dense
  area (causal: query block i can visit only the blocks up to its diagonal, so it takes
  min(K, visible)), and at least 1.

A method's ``Config`` leaves its budget fields None to follow this rule; :class:`LengthBudget`
then runs each call as the method configured for that call's shape (an explicit value wins).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ...errors import check_int
from ...method import Call

REFERENCE_KEYS = 4096  # the length at which the density target is REFERENCE_DENSITY
REFERENCE_DENSITY = 0.15
TOKENS_PER_BLOCK_STEP = 256  # block size ~ N / 256
MIN_BLOCK, MAX_BLOCK = 16, 128
ESTIMATE_LOGITS = 1 << 20  # logits per head an estimate from sampled queries reads
MIN_ESTIMATE_QUERIES = 64


def check_budget(argument: str, value: object, *, minimum: int = 1) -> int | None:
    """None (the budget rule decides per call) or an integer >= ``minimum``."""
    return None if value is None else check_int(argument, value, minimum=minimum)


def block_size_for(n_keys: int, round_down: bool = False) -> int:
    """Block size at ``n_keys`` keys: the power of two nearest n_keys / 256 (``round_down``: the
    largest not above it), within [16, 128]."""
    exponent = (math.floor if round_down else round)(math.log2(max(n_keys, 1) / TOKENS_PER_BLOCK_STEP))
    return int(min(MAX_BLOCK, max(MIN_BLOCK, 2 ** exponent)))


def density_for(n_keys: int) -> float:
    """Density target at ``n_keys`` keys: min(1, 0.15 * 4096 / n_keys)."""
    return min(1.0, REFERENCE_DENSITY * REFERENCE_KEYS / max(n_keys, 1))


def estimate_queries_for(n_keys: int) -> int:
    """Queries an estimate reads at ``n_keys`` keys: max(64, 2^20 / n_keys)."""
    return max(MIN_ESTIMATE_QUERIES, ESTIMATE_LOGITS // max(n_keys, 1))


def visible_blocks(len_q: int, len_kv: int, block: int, causal: bool) -> torch.Tensor:
    """(nQB,) key blocks each query block can visit (all of them, or up to its diagonal, causal
    aligned bottom-right)."""
    nqb, nkb = -(-len_q // block), -(-len_kv // block)
    if not causal:
        return torch.full((nqb,), nkb)
    last_query = torch.clamp(torch.arange(1, nqb + 1) * block, max=len_q) - 1
    return ((last_query + len_kv - len_q) // block + 1).clamp(min=0, max=nkb)


def blocks_for(density: float, len_q: int, len_kv: int, block: int, causal: bool) -> int:
    """The most key blocks K per query block whose block support (min(K, visible) per query block)
    stays within ``density`` of the visible blocks; at least 1."""
    visible = visible_blocks(len_q, len_kv, block, causal)
    allowed = density * float(visible.sum())
    low, high = 1, max(1, int(visible.max()))
    while low < high:  # the largest K with sum(min(K, visible)) <= allowed
        mid = (low + high + 1) // 2
        if float(visible.clamp(max=mid).sum()) <= allowed:
            low = mid
        else:
            high = mid - 1
    return low


@dataclass(frozen=True)
class Budget:
    """The rule's values at one call: ``block_size`` tokens, the ``density`` target and ``key_blocks``
    (K) per query block."""

    block_size: int
    density: float
    key_blocks: int


def budget_at(call: Call, block_size: int | None = None, round_down: bool = False) -> Budget:
    """The rule at this call's shape (the number of keys sets the density, and the block size
    unless ``block_size`` is given: K then counts blocks of that size; ``round_down``: see
    :func:`block_size_for`)."""
    block = block_size or block_size_for(call.len_kv, round_down)
    density = density_for(call.len_kv)
    return Budget(block, density, blocks_for(density, call.len_q, call.len_kv, block, call.causal))


class LengthBudget:
    """Mixin for a block-selection method whose ``Config`` leaves budget fields None: each call runs
    as the same method with those fields set by :meth:`budget_config` at the call's shape (one
    configured copy per distinct budget, kept), explicit values untouched."""

    round_block_down = False  # the default block size: the power of two nearest N / 256, or below it

    def budget_config(self, budget: Budget, call: Call) -> dict:  # pragma: no cover - abstract
        """The budget fields of this method for ``budget`` (each used only where the config is None)."""
        raise NotImplementedError

    def at_budget(self, call: Call):
        """This method with every None budget field filled in for ``call`` (itself when none is None)."""
        config = dataclasses.asdict(self.config)
        unset = [name for name, value in config.items() if value is None]
        if not unset:
            return self
        rule = budget_at(call, self.config.block_size, self.round_block_down)
        filled = {name: value for name, value in self.budget_config(rule, call).items() if name in unset}
        if not filled:
            return self
        key = tuple(sorted(filled.items()))
        configured = self.__dict__.setdefault("_configured", {})
        if key not in configured:
            configured[key] = type(self)(backend=self.backend, **{**config, **filled})
        return configured[key]

    def budgets_used(self) -> list[dict]:
        """The budget fields of each configured copy built so far (what the rule chose)."""
        return [dict(key) for key in self.__dict__.get("_configured", {})]

    def plan(self, q, k, call: Call):
        method = self.at_budget(call)
        return super().plan(q, k, call) if method is self else method.plan(q, k, call)
