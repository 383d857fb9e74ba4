"""HyperAttention's sortLSH blocks, samples and causal recursion against a literal reference, and the wrong rules it must catch."""

from __future__ import annotations

import pytest
import torch
from fidelity.dynamic.checks import mutant_test
from fidelity.mutation import Mutant
from helpers import rel_err

import attnzoo
from attnzoo.methods.dynamic import hyper

CONFIGS = [
    dict(block_size=8, sample_size=8, num_projections=4, min_seq_len=16, seed=0),
    dict(block_size=4, sample_size=6, num_projections=3, min_seq_len=12, seed=3),
]


def check(config: dict, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    method = attnzoo.get_method("hyper", **config)
    for B, Hq, Hkv, n, causal in [(1, 2, 2, 64, False), (2, 2, 1, 50, True)]:
        q = torch.randn(B, Hq, n, 8, generator=gen, dtype=torch.float64)
        k = torch.randn(B, Hkv, n, 8, generator=gen, dtype=torch.float64)
        v = torch.randn(B, Hkv, n, 8, generator=gen, dtype=torch.float64)
        ref = method.reference(q, k, v, causal=causal, scale=0.25)
        err = rel_err(method(q, k, v, causal=causal, scale=0.25), ref)
        assert err <= 1e-9, f"hyper {config} n={n} causal={causal} seed={seed}: error {err:.2e}"


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_hyper_is_the_papers(config, rng):
    check(config, rng.initial_seed())


def _no_lsh(self, x, planes):
    """Blocks of consecutive tokens instead of hash buckets."""
    return torch.arange(x.shape[2], device=x.device).expand(*x.shape[:3])


MUTANTS = [
    Mutant("hyper-no-lsh", hyper.HyperAttention, "_hash_order", _no_lsh),
    Mutant("hyper-binary-not-gray-order", hyper, "_gray_rank", lambda code, bits: code),
]

test_mutant_is_caught = mutant_test(MUTANTS, lambda seed: check(CONFIGS[0], seed))
