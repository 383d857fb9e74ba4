"""SG-Former's significance-guided token reallocation against a literal reference of the documented
rule, and the wrong rules it must catch."""

from __future__ import annotations

import pytest
import torch
from fidelity.dynamic.checks import mutant_test, row_strips
from fidelity.mutation import Mutant
from helpers import rel_err

import attnzoo
from attnzoo.methods.dynamic import sgformer
from attnzoo.methods.dynamic.scoring import block_means

_token_significance = sgformer._token_significance

CONFIGS = [
    dict(n_win=4, num_tokens=12, grid=(8, 8)),
    dict(n_win=6, num_tokens=20, grid=None),
    dict(n_win=4, num_tokens=16, grid=(8, 8), reallocation="tiers"),
    dict(n_win=6, num_tokens=30, grid=None, reallocation="tiers"),
]


def check(config: dict, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    method = attnzoo.get_method("sgformer", **config)
    n = 64 if config["grid"] else 96
    for B, Hq, Hkv in [(1, 2, 2), (2, 4, 2)]:
        q = torch.randn(B, Hq, n, 8, generator=gen, dtype=torch.float64) * 2
        k = torch.randn(B, Hkv, n, 8, generator=gen, dtype=torch.float64) * 2
        v = torch.randn(B, Hkv, n, 8, generator=gen, dtype=torch.float64)
        err = rel_err(method(q, k, v, scale=0.5), method.reference(q, k, v, scale=0.5))
        assert err <= 1e-9, f"sgformer {config} B={B} Hq={Hq} seed={seed}: error {err:.2e}"


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_reallocation_follows_its_definition(config, rng):
    check(config, rng.initial_seed())


def _local_mass(q_regions, k_regions, size, scale):
    qw, kw = q_regions.unflatten(2, (-1, size)), k_regions.unflatten(2, (-1, size))
    return torch.softmax(qw @ kw.transpose(-1, -2) * scale, dim=-1).mean(3).flatten(2)


MUTANTS = [
    Mutant("sgformer-uniform-significance", sgformer, "block_means", lambda x, block: block_means(x, block) * 0),
    Mutant("sgformer-row-strip-regions", sgformer, "region_order", row_strips),
    Mutant("sgformer-tiers-least-significant-finest", sgformer, "_token_significance",
           lambda *args: -_token_significance(*args)),
    Mutant("sgformer-tiers-without-the-local-map", sgformer, "_token_significance",
           lambda q_regions, k_regions, size, scale: _token_significance(q_regions, k_regions, size, scale)
           - _local_mass(q_regions, k_regions, size, scale)),
]

test_mutant_is_caught = mutant_test(MUTANTS, lambda seed: [check(config, seed) for config in CONFIGS[::2]])
