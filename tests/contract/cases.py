"""The contract suite's default cases: every registered method with one or more small configs.

One :class:`Case` per configuration drives every shared check in ``test_contract.py``; a method
registered without a case, or a case naming no registered method, fails the suite. The configs are
the family tests' small ones: inputs of ~150 tokens (B=2, Hq=4, Hkv=2, D=16, Dv=8), well under a
second per check. A case says where its config restricts what the method's ``info`` promises
(``unsupported``), why its causal outputs depend on later tokens (``prefix``: the prefix check is
then expected to fail), and which checks fail today (``xfail``, strict: the lead fixes the method, then the mark
goes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from helpers import qkv

import attnzoo
from attnzoo.errors import InvalidArgumentError
from attnzoo.method import Method, MethodInfo
from attnzoo.registry import method_class

TOKENS = 150  # sequence length of 1-D cases
SHAPE = dict(B=2, Hq=4, Hkv=2, D=16, Dv=8)  # Hq = 2 Hkv: every call is grouped-query attention
TOKEN_CUTS = (1, 64, 97)  # prefix lengths of the causal prefix check
BLOCK_CUTS = (64, 96)  # whole query blocks (of 16 and 32): a block's selection pools all of its queries
MODES = ("causal", "non_causal", "cross", "gqa")


@dataclass(frozen=True)
class Failure:
    """A check a case fails today: the exception it raises (AssertionError for a wrong value) and
    the exact failure; marked strict, so a pass fails the suite (a fixed bug must lose its mark)."""

    raises: type[BaseException]
    reason: str


@dataclass(frozen=True)
class Case:
    """One configured method. ``grid``: the token grid of a spatial method (passed as ``grid=``);
    ``tokens``: sequence length of a 1-D case; ``qk_scale`` multiplies q and k (softmax estimates
    are compared on moderate logits); ``bad``: options with an invalid value, each of which must
    raise an InvalidArgumentError naming it (at construction or at the first call);
    ``unsupported``: mode -> regex of the UnsupportedError message, for modes the ``info`` allows
    but this config does not; ``prefix``: why causal outputs depend on later tokens ('' when they
    do not; the prefix check is then skipped with that reason, as random inputs may or may not show
    it); ``length_dependent``: why a shorter call is not the prefix of a longer one;
    ``xfail``: check (or check-variant, e.g. ``half-bfloat16``) -> its :class:`Failure`."""

    method: str
    config: dict = field(default_factory=dict)
    grid: tuple[int, ...] | None = None
    tokens: int = TOKENS
    qk_scale: float = 1.0
    bad: dict = field(default_factory=dict)
    unsupported: dict = field(default_factory=dict)
    prefix: str = ""
    prefix_cuts: tuple[int, ...] = TOKEN_CUTS
    length_dependent: str = ""
    xfail: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        parts = [self.method] + [f"{k}={_compact(v)}" for k, v in self.config.items()]
        if self.grid is not None:
            parts.append("grid=" + "x".join(map(str, self.grid)))
        elif self.tokens != TOKENS:
            parts.append(f"N={self.tokens}")
        return "-".join(parts)

    @property
    def info(self) -> MethodInfo:
        return method_class(self.method).info

    @property
    def length(self) -> int:
        """Tokens of a self-attention call: num_global + prod(grid), or ``tokens``."""
        if self.grid is None:
            return self.tokens
        return self.config.get("num_global", 0) + math.prod(self.grid)

    def options(self, **changes) -> dict:
        """The full config (grid included), with ``changes`` applied."""
        config = dict(self.config, grid=self.grid) if self.grid is not None else dict(self.config)
        return {**config, **changes}

    def make(self, **changes) -> Method:
        return attnzoo.get_method(self.method, **self.options(**changes))

    def supports(self, mode: str) -> bool:
        """Whether ``mode`` (one of MODES) runs: the info allows it and the config does not forbid it."""
        return getattr(self.info, mode) and mode not in self.unsupported

    def refusal(self, mode: str) -> str:
        """Regex the UnsupportedError of an unsupported ``mode`` must match."""
        return self.unsupported.get(mode) or {"causal": "causal", "non_causal": "causal", "cross": "self-attention",
                                               "gqa": "grouped-query"}[mode]

    @property
    def causal_flags(self) -> list[bool]:
        """The ``causal=`` values this case runs, causal first."""
        return [flag for flag, mode in ((True, "causal"), (False, "non_causal")) if self.supports(mode)]

    def inputs(self, gen: torch.Generator, *, nq: int | None = None, nk: int | None = None, **shape):
        """Random q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); q and k times ``qk_scale``."""
        nq = self.length if nq is None else nq
        q, k, v = qkv(gen, **{**SHAPE, "Nq": nq, "Nk": nk, **shape})
        return q * self.qk_scale, k * self.qk_scale, v


def _compact(value) -> str:
    return str(value).replace(" ", "")


LINEAR = dict(qk_scale=0.5)
DECAY_IS_CAUSAL = {"non_causal": "decay needs causal=True"}
GLOBALS_ARE_NOT_CAUSAL = {"causal": "causal=True needs num_global=0"}
SELECTED_BLOCKS = dict(prefix_cuts=BLOCK_CUTS)
CASES = [
    Case("dense", bad={"backend": "fast"}),
    Case("act", dict(threshold=0.02, beta=0.4), bad={"threshold": 1.5, "beta": -0.1},
         prefix="a key's sink score averages the attention of every query of the call that sees it, later ones included"),
    Case("echo", bad={"backend": "fast"}),
    # ---- local: position patterns ----------------------------------------------------------
    Case("sliding_window", dict(window=37), bad={"window": 0}),
    Case("sliding_window", dict(left=9, right=4), bad={"left": -1, "right": "4"}),
    Case("streaming", dict(sinks=3, window=20), bad={"window": 0, "sinks": -1}),
    Case("s2", dict(block_size=16, local_blocks=2, vert_stride=4), bad={"vert_stride": 0, "block_size": 0}),
    Case("moa", dict(spans=[10, 50, 100, 7], sinks=4), bad={"spans": [10, 50], "sinks": -1}),
    Case("moa", dict(alpha=[5, 5, 10, 20], beta=[0.1, 0.0, 0.05, 0.2], sinks=0), bad={"beta": [0.1]},
         length_dependent="elastic spans alpha + beta * N grow with the key length"),
    Case("neighborhood", dict(kernel_size=7), grid=(100,), bad={"kernel_size": 0}),
    Case("neighborhood", dict(kernel_size=(5, 3), dilation=(1, 2)), grid=(16, 12), bad={"dilation": 0, "kernel_size": (5, 3, 3)}),
    Case("neighborhood", dict(kernel_size=4, is_causal=True), grid=(12, 10), bad={"is_causal": "yes"}),
    Case("neighborhood", dict(kernel_size=3, is_causal=(True, False, False)), grid=(4, 5, 6), bad={"kernel_size": 7}),
    Case("neighborhood", dict(kernel_size=5, num_global=3), grid=(9, 11), unsupported=GLOBALS_ARE_NOT_CAUSAL,
         bad={"num_global": -1, "grid": (9, 12)}),
    Case("clear", dict(radius=3.5), grid=(16, 16), bad={"radius": 0}),
    Case("clear", dict(radius=2.0, num_global=5), grid=(9, 11), bad={"radius": -1.0}),
    Case("clear", dict(radius=3.5, down_factor=2), grid=(16, 16), bad={"down_factor": 0}),
    Case("halo", dict(block_size=4, halo=2), grid=(16, 16), bad={"halo": -1}),
    Case("halo", dict(block_size=4, halo=1, num_global=2), grid=(10, 13), bad={"block_size": 0}),
    Case("maxvit_block", dict(block_size=4), grid=(16, 16), bad={"block_size": 0}),
    Case("maxvit_block", dict(block_size=(4, 7), num_global=3), grid=(10, 14), bad={"block_size": (4, 7, 1)}),
    Case("maxvit_grid", dict(grid_size=4), grid=(16, 16), bad={"grid_size": 5}),
    Case("maxvit_grid", dict(grid_size=(3, 5), num_global=2), grid=(12, 10), bad={"grid_size": 0}),
    Case("hilo", dict(alpha=0.5, window=2), grid=(8, 12), bad={"alpha": 1.5, "window": 5}),
    # ---- dynamic: content-selected blocks ---------------------------------------------------
    *[Case("vertical_slash", cfg, bad=bad, prefix="the vertical and slash masses are estimated from queries anywhere in the "
           "sequence (the last ones, or spread over it), so later tokens can change the blocks earlier queries visit",
           **SELECTED_BLOCKS)
      for cfg, bad in (
          (dict(vertical_blocks=2, slash_blocks=2, block_size=16, last_q=16), {"vertical_blocks": 0, "block_size": 0}),
          (dict(vertical_blocks=2, slash_blocks=2, block_size=16, last_q=16, estimate_queries="spread"), {"estimate_queries": "first"}),
          (dict(vertical_blocks=1, slash_blocks=2, block_size=16, last_q=16, vertical_columns=7), {"vertical_columns": -1, "last_q": 0}),
      )],
    Case("block_sparse", dict(top_k=2, block_size=16), bad={"top_k": 0, "block_size": 1}, **SELECTED_BLOCKS),
    Case("block_sparse", dict(top_k=2, block_size=16, estimator="sampled_q"), bad={"estimator": "max", "samples": 0}, **SELECTED_BLOCKS),
    Case("seer", dict(top_k=2, block_size=16), bad={"top_k": 0, "gate_dim": 3, "rope_base": 1.0}, **SELECTED_BLOCKS),
    Case("seer", dict(threshold=0.2, block_size=16), bad={"threshold": 1.5}, **SELECTED_BLOCKS),
    Case("sparsifiner", dict(density=0.2, rank=4), bad={"density": 0.0, "rank": 0}),
    Case("moh", dict(active=0.5, shared=1), bad={"active": 1.5, "shared": 4}),
    Case("hip", dict(top_k=2, block_size=16), bad={"top_k": 0, "block_size": 0, "local_blocks": -1}, **SELECTED_BLOCKS),
    Case("hip", dict(top_k=2, block_size=16, query_samples=4), bad={"query_samples": -1}, **SELECTED_BLOCKS),
    Case("hip", dict(top_k=5, block_size=16, key_block_size=4), bad={"key_block_size": 1}, **SELECTED_BLOCKS),
    Case("hip", dict(top_k=2, block_size=16, branch_score="bound"), bad={"branch_score": "max"}, **SELECTED_BLOCKS),
    Case("hip", dict(top_k=2, block_size=16, branch_score="paper"), bad={"branch_score": "representative"}, **SELECTED_BLOCKS),
    Case("hip", dict(top_k=2, block_size=16, candidates=3, rerank_samples=3), bad={"candidates": 0, "rerank_samples": 0},
         **SELECTED_BLOCKS),
    Case("biformer", dict(n_win=6, topk=2), bad={"n_win": 7, "topk": 0}),
    Case("biformer", dict(n_win=2, topk=2), grid=(8, 12), bad={"n_win": 3, "grid": (8, 12, 1)}),
    Case("routing", dict(num_clusters=3, block_size=16), bad={"num_clusters": 0, "block_size": 0},
         prefix="k-means centroids are fitted on every query and key of the call, later ones included"),
    Case("routing", dict(num_clusters=3, block_size=16, balanced=False), bad={"balanced": "yes"},
         prefix="k-means centroids are fitted on every query and key of the call, later ones included"),
    *[Case("hyper", dict(block_size=16, sample_size=8, min_seq_len=40), tokens=n, bad={"sample_size": 0, "min_seq_len": 1},
           prefix="the off-diagonal blocks of the causal recursion are sorted by LSH over all of their queries and "
           "sample keys uniformly, so a later query moves an earlier one's LSH block")
      for n in (256, 301)],
    *[Case("sgformer", cfg, grid=grid, bad=bad)
      for cfg, grid, bad in ((dict(n_win=4, num_tokens=20), (16, 12), {"num_tokens": 0, "grid": (7, 7)}),
                             (dict(n_win=6, num_tokens=9), None, {"n_win": 7}))],
    Case("sgformer", dict(n_win=4, num_tokens=20, reallocation="tiers"), grid=(16, 12), bad={"reallocation": "sorted"}),
    # ---- linear -----------------------------------------------------------------------------
    Case("linear", dict(), bad={"chunk": 0}, **LINEAR),
    Case("linear", dict(feature_map="relu", chunk=16), bad={"eps": 2.0}, **LINEAR),
    Case("linear", dict(feature_map="softmax"), bad={"eps": -1.0}, **LINEAR),
    Case("performer", dict(num_features=32), bad={"num_features": 0, "seed": -1}, **LINEAR),
    Case("lightning", dict(decay="alibi", chunk=32), bad={"decay": 1.5}, unsupported=DECAY_IS_CAUSAL, **LINEAR),
    Case("lightning", dict(decay=[0.5, 0.9, 0.99, 1.0], feature_map="silu"), bad={"decay": [0.9, 0.8]},
         unsupported=DECAY_IS_CAUSAL, **LINEAR),
    Case("lightning", dict(), bad={"decay": "linear"}, **LINEAR),
    Case("transnormer", dict(chunk=32), bad={"mode": "banded", "lrpe_base": 0.5}, **LINEAR),
    Case("transnormer", dict(decay=0.95, lrpe=False), bad={"lrpe": "yes"}, unsupported=DECAY_IS_CAUSAL, **LINEAR),
    Case("transnormer", dict(mode="diag", block_size=32), bad={"block_size": 0},
         unsupported={"cross": "mode='diag' needs self-attention"}, **LINEAR),
    Case("hedgehog", dict(width=8), bad={"feature_map": "spiky", "width": 0}, **LINEAR),
    Case("linfusion", dict(), bad={"width": 0, "feature_map": "elu"}, **LINEAR),
    Case("rala", dict(), bad={"eps": 2.0}, **LINEAR),
    Case("inline", dict(), bad={"window": -1}, **LINEAR),
    Case("inline", dict(feature_map="elu", window=0), bad={"chunk": 0}, **LINEAR),
    Case("agent", dict(num_agents=10), bad={"num_agents": -1},
         **LINEAR),
    Case("random_feature", dict(num_heads=6, query_block=32), bad={"activation": "tanh", "std": -1.0}, **LINEAR),
    Case("random_feature", dict(num_heads=4, activation="softmax", query_block=50), bad={"values": torch.zeros(3, 4, 4)}, **LINEAR),
    Case("scatterbrain", dict(num_features=16, bucket_chunk=16), bad={"num_buckets": 3},
         prefix="tokens are sorted by LSH bucket over the whole sequence and cut into chunks, so a later token moves "
         "an earlier one's chunk", **LINEAR),
    Case("sea", dict(top_k=24, q_block=16), bad={"top_k": 0, "q_block": 0}, prefix_cuts=(16, 64, 96), **LINEAR),
]
