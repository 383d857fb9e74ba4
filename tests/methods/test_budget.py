"""The default budget rule of hip, block_sparse and vertical_slash (methods/dynamic/budget.py): its
values, the key blocks it allows against a brute-force count from the dense causal mask, and the
methods called without options running as the method configured with the rule's values."""

import math

import pytest
import torch

import attnzoo
from attnzoo.methods.dynamic import budget

METHODS = ("block_sparse", "hip", "vertical_slash")


def test_rule_values():
    for n in (256, 1024, 4096, 16384, 65536, 1 << 20):
        b = budget.block_size_for(n)
        assert b in (16, 32, 64, 128)
        assert b == min(128, max(16, 2 ** round(math.log2(n / 256))))
        assert budget.density_for(n) == pytest.approx(min(1.0, 0.15 * 4096 / n))
        assert budget.estimate_queries_for(n) * n >= min(1 << 20, 64 * n)
    assert [budget.block_size_for(n) for n in (4096, 8192, 16384, 32768)] == [16, 32, 64, 128]
    for n in (1024, 4096, 6144, 7168, 8192, 12288, 16384, 65536):  # hip's: the power of two at most N / 256
        assert budget.block_size_for(n, round_down=True) == min(128, max(16, 2 ** math.floor(math.log2(n / 256)))), n
    assert [budget.block_size_for(n, round_down=True) for n in (7168, 8192, 12288, 16384)] == [16, 32, 32, 64]
    assert budget.density_for(2048) == 0.3 and budget.density_for(16384) == pytest.approx(0.0375)
    with pytest.raises(attnzoo.AttnzooError, match="top_k"):
        attnzoo.get_method("block_sparse", top_k=0)


def _visible_by_mask(len_q, len_kv, block, causal):
    """Key blocks per query block holding at least one visible pair, from the dense mask."""
    allowed = torch.ones(len_q, len_kv, dtype=torch.bool)
    if causal:  # bottom-right: query i sees key j <= i + Nk - Nq
        allowed = torch.arange(len_kv)[None, :] <= torch.arange(len_q)[:, None] + (len_kv - len_q)
    nqb, nkb = -(-len_q // block), -(-len_kv // block)
    padded = torch.zeros(nqb * block, nkb * block, dtype=torch.bool)
    padded[:len_q, :len_kv] = allowed
    return padded.view(nqb, block, nkb, block).any(3).any(1).sum(1)


@pytest.mark.parametrize("len_q,len_kv,block", [(100, 100, 16), (64, 256, 16), (256, 256, 32), (37, 37, 8)])
def test_key_blocks_are_the_most_within_the_density(len_q, len_kv, block):
    for causal in (False, True):
        visible = _visible_by_mask(len_q, len_kv, block, causal)
        assert torch.equal(budget.visible_blocks(len_q, len_kv, block, causal), visible)
        for density in (0.05, 0.2, 0.5, 1.0):
            k = budget.blocks_for(density, len_q, len_kv, block, causal)
            within = [K for K in range(1, int(visible.max()) + 1) if visible.clamp(max=K).sum() <= density * visible.sum()]
            assert k == max(within, default=1), (causal, density)


@pytest.mark.parametrize("name", METHODS)
def test_defaults_run_as_the_method_configured_by_the_rule(name, rng):
    q, k, v = (torch.randn(1, 2, 512, 16, generator=rng) for _ in range(3))
    default = attnzoo.get_method(name)
    out = default(q, k, v, causal=True)
    (chosen,) = default.budgets_used()
    assert chosen["block_size"] == budget.block_size_for(512, default.round_block_down)
    explicit = attnzoo.get_method(name, **chosen)
    assert torch.equal(out, explicit(q, k, v, causal=True)), rng.initial_seed()
    assert torch.equal(default.support(q, k, v, causal=True), explicit.support(q, k, v, causal=True))
    default(q, k, v, causal=True)
    assert len(default.budgets_used()) == 1  # the configured copy is kept


def test_hip_default_rounds_the_block_size_down_and_scores_by_the_bound(rng):
    """At 6K keys the shared rule's nearest power of two is 32; hip's and block_sparse's defaults
    take 16 (the 7K passkey, README "Defaults"), hip the bound branch score."""
    q, k, v = (torch.randn(1, 1, 6144, 16, generator=rng) for _ in range(3))
    hip, block_sparse = attnzoo.get_method("hip"), attnzoo.get_method("block_sparse")
    assert hip.config.branch_score == "bound"
    for method in (hip, block_sparse):
        method(q[:, :, -64:], k, v, causal=True)
    assert hip.budgets_used()[0]["block_size"] == 16 and block_sparse.budgets_used()[0]["block_size"] == 16


def test_explicit_values_win(rng):
    q, k, v = (torch.randn(1, 1, 512, 16, generator=rng) for _ in range(3))
    m = attnzoo.get_method("block_sparse", top_k=3)
    m(q, k, v, causal=True)
    assert m.budgets_used() == [{"block_size": 16}]
    m = attnzoo.get_method("block_sparse", block_size=32)  # K counts blocks of the size given
    m(q, k, v, causal=True)
    assert m.budgets_used() == [{"top_k": budget.blocks_for(budget.density_for(512), 512, 512, 32, True)}]
    m = attnzoo.get_method("vertical_slash", slash_blocks=3)
    m(q, k, v, causal=True)
    assert m.budgets_used()[0]["vertical_columns"] == 0 and "slash_blocks" not in m.budgets_used()[0]
    fixed = attnzoo.get_method("hip", top_k=4, block_size=32)
    fixed(q, k, v, causal=True)
    assert fixed.budgets_used() == []


# block selections stay within the target (up to the diagonal blocks' partial tiles); vertical_slash
# takes a nominal 1.2 K blocks whose parts overlap on real text (0.140 at 4K on SmolLM2) and less on
# random inputs, where it lands up to 1.17x the target
SLACK = {"block_sparse": 1.02, "hip": 1.02, "vertical_slash": 1.2}


@pytest.mark.parametrize("name", METHODS)
def test_default_density_stays_within_the_target_and_falls_with_length(name, rng):
    densities = []
    for n in (2048, 4096, 8192):
        q, k, v = (torch.randn(1, 1, n, 16, generator=rng) for _ in range(3))
        _, stats = attnzoo.get_method(name)(q, k, v, causal=True, return_stats=True)
        assert stats.density <= budget.density_for(n) * SLACK[name], (n, stats.density, rng.initial_seed())
        densities.append(stats.density)
    assert densities[0] > densities[1] > densities[2] > budget.density_for(8192) / 2, densities
