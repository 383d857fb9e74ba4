"""Deliberately wrong variants of every cache policy (and of the ragged harness) that the cache tests must catch.

Each mutant replaces one rule by monkeypatching (:class:`fidelity.mutation.Mutant`); its check is an
existing test's body (a reference written from the paper, or a planted key that must survive) run on
a generator seeded from the test's seed. ``assert_caught`` first runs the check unmutated."""

from __future__ import annotations

import pytest
import torch

import cache.test_moa_cache as moa_tests
import cache.test_moa_search as search_tests
import cache.test_selective as selective_tests
import cache.test_policies as policy_tests
from attnzoo.cache import attend, h2o, moa_search, selective, snapkv, streaming_llm
from attnzoo.cache.diffqkv import DiffQKV
from attnzoo.cache.moa_cache import MoACache
from fidelity.mutation import Mutant, assert_caught

transformers = pytest.importorskip("transformers")
import cache.test_compress as compress_tests
import cache.test_diffqkv as diffqkv_tests
from attnzoo.integrations.transformers import compress as compress_module
from attnzoo.integrations.transformers.compress import Budget, DiffQKVLayer, SelectiveLayer
from attnzoo.kernels.dense import sdpa


def planted_survives(name, options):
    def check(rng):
        layer = compress_tests.planted_cache(rng, name, options)
        assert (layer.positions == 13).any(dim=-1).all()
    return check


def streaming_window(rng):
    compress_tests.test_streaming_llm_drops_a_planted_key_outside_its_window(rng)


def ragged_planted_survives(rng):
    """A planted key every query attends to survives on both heads of a ragged layer with budgets 8 and 12."""
    policy = snapkv.SnapKV(window=4)
    layer = compress_module.RaggedLayer(policy, Budget(None, (8, 12), 4, None), 0)
    direction = torch.randn(16, generator=rng)
    queries = direction + 0.1 * torch.randn(1, 4, 40, 16, generator=rng)
    keys = 0.1 * torch.randn(1, 2, 40, 16, generator=rng)
    keys[:, :, 13] = 3 * direction
    layer.update(keys, torch.randn(1, 2, 40, 16, generator=rng))
    layer.observe(queries, None, 16 ** -0.5)
    assert layer.head_lengths() == [8, 12]
    assert all(bool((p == 13).any()) for p in layer.head_positions)


def diffqkv_selects_on_a_held_cache(rng):
    """Decode over a held DiffQKV cache with v_top 3: each query head's output is the softmax over
    its 3 best logits against the mean of the two K heads, of its own V head."""
    layer = DiffQKVLayer(DiffQKV(k_heads=1, v_top=3), Budget(None, None, 1, None), 0)
    keys, values = torch.randn(1, 2, 9, 8, generator=rng), torch.randn(1, 2, 9, 8, generator=rng)
    layer.update(keys[:, :, :8], values[:, :, :8])
    layer.observe(torch.randn(1, 4, 8, 8, generator=rng), None, 0.5)
    layer.update(keys[:, :, 8:], values[:, :, 8:])
    queries = torch.randn(1, 4, 1, 8, generator=rng)
    out = layer.observe(queries, None, 0.5)
    shared = (keys[0, 0] + keys[0, 1]) / 2
    for head in range(4):
        expected = diffqkv_tests.reference_row(queries[0, head, 0], shared, values[0, head // 2], [True] * 9, 0.5, 3)
        assert torch.allclose(out[0, head, 0], expected, atol=1e-5), head


def seeded(test, *args):
    return lambda rng: test(rng, *args)


def unseeded(test, *args):
    return lambda rng: test(*args)


votes = snapkv.attention_votes
profile_losses = moa_search.profile_losses
CASES = [
    # snapkv: unpooled votes; no observation window (no votes); votes of one query head per group
    (Mutant("snapkv-unpooled", snapkv.F, "max_pool1d", lambda x, *a, **k: x), seeded(policy_tests.test_snapkv_score_matches_the_paper, "max")),
    (Mutant("snapkv-no-observation-window", snapkv.SnapKV, "observation", property(lambda self: 0)), planted_survives("snapkv", {"window": 4})),
    (Mutant("snapkv-one-query-head", snapkv, "attention_votes",
            lambda q, k, p, s: votes(q[:, ::q.shape[1] // k.shape[1]], k, p, s)), seeded(policy_tests.test_snapkv_score_matches_the_paper, "max")),
    # streaming_llm: no sinks; sinks counted over stored entries (padding included)
    (Mutant("streaming-no-sinks", streaming_llm.StreamingLLM, "score", lambda self, view: view.positions.float()),
     seeded(policy_tests.test_streaming_llm_scores_sinks_then_recency)),
    (Mutant("streaming-sinks-count-padding", streaming_llm.StreamingLLM, "score",
            lambda self, view: torch.where(torch.arange(view.positions.shape[-1]) < self.config.sinks, float("inf"), view.positions.float())),
     seeded(policy_tests.test_streaming_llm_scores_sinks_then_recency)),
    # h2o: no recent window; nothing accumulated
    (Mutant("h2o-no-recent", h2o.H2O, "score", lambda self, view: view.accumulated), seeded(policy_tests.test_h2o_keeps_recent_and_heavy)),
    (Mutant("h2o-accumulates-nothing", h2o.H2O, "accumulate", lambda self, q, k, p, s: torch.zeros(k.shape[:3])), planted_survives("h2o", {})),
    # selective: the first token may be pruned; negative logits also mask (no ReLU)
    (Mutant("selective-first-token-prunable", selective.Selective, "score", lambda self, view: -view.accumulated),
     seeded(policy_tests.test_selective_accumulates_relu_logits_of_one_head)),
    (Mutant("selective-no-relu", selective.torch, "relu", lambda x: x), seeded(policy_tests.test_selective_accumulates_relu_logits_of_one_head)),
    # selective with subtract=True: nothing subtracted; a call's F forgets what earlier calls accumulated
    (Mutant("selective-subtracts-nothing", selective.Selective, "attend",
            lambda self, q, k, v, p, before, scale: (sdpa(q, k, v, causal=True, scale=scale), torch.zeros(k.shape[:3]))),
     seeded(selective_tests.test_prefill_and_decode_match_the_paper, 4, 2, 0, None)),
    (Mutant("selective-subtracts-nothing-planted", selective.Selective, "attend",
            lambda self, q, k, v, p, before, scale: (sdpa(q, k, v, causal=True, scale=scale), torch.zeros(k.shape[:3]))),
     seeded(selective_tests.test_a_key_the_selecting_head_masks_is_hidden_from_every_head_after_it)),
    (Mutant("selective-forgets-earlier-calls", SelectiveLayer, "_attend",
            lambda self, q, scale, deferred: self.policy.attend(q, self.keys, self.values, self.positions, 0 * self.accumulated[:, 0], scale)[0]),
     seeded(selective_tests.test_prefill_and_decode_match_the_paper, 4, 2, 0, None)),
    # moa_cache: spans without the sinks; the narrowest span of a KV group; the oldest keys instead of the latest
    (Mutant("moa-no-sinks", MoACache, "head_budgets",
            lambda self, layer, heads, n: [min(n, max(1, round(a + b * n))) for a, b in zip(self.config.alpha, self.config.beta)]),
     unseeded(moa_tests.test_head_budgets_follow_the_rules)),
    (Mutant("moa-narrowest-of-group", MoACache, "head_budgets",
            lambda self, layer, heads, n: [1 + min(round(a + b * n) for a, b in self.config.layers[layer][h * 2:h * 2 + 2]) for h in range(heads)]),
     unseeded(moa_tests.test_per_query_head_rules_keep_the_widest_of_a_group, None)),
    (Mutant("moa-oldest-keys", MoACache, "score", lambda self, view: -view.positions.float()),
     lambda rng: moa_tests.test_each_head_keeps_its_sinks_and_its_span(rng, compress_tests.tiny_llama())),
    # moa_search: the influence without the row's renormalisation, without the 1 / (1 - A) of masking
    # the entry itself; the dropped attention mass in place of the gradient-weighted influence
    (Mutant("moa-influence-no-renormalisation", moa_search, "influence", lambda a, g: (a.double() * g.double()).abs()),
     seeded(search_tests.test_influence_matches_the_gradient_through_an_explicit_attention_matrix)),
    (Mutant("moa-influence-first-order-in-a", moa_search, "influence",
            lambda a, g: (a.double() * ((a.double() * g.double()).sum(-1, keepdim=True) - g.double())).abs()),
     seeded(search_tests.test_influence_predicts_the_loss_rise_of_masking_one_entry)),
    (Mutant("moa-search-by-mass", moa_search, "profile_losses", lambda m, ids, spans, lengths, sinks, loss: profile_losses(m, ids, spans, lengths, sinks, "mass")),
     seeded(search_tests.test_the_gradient_search_gives_a_head_that_cannot_matter_the_smallest_span)),
    # diffqkv: the first K head of a group instead of their mean; V read at every key despite v_top
    (Mutant("diffqkv-first-key-head", compress_module, "merge_keys", lambda keys, k: keys[:, :k]), diffqkv_selects_on_a_held_cache),
    (Mutant("diffqkv-all-values", compress_module, "head_attention", lambda q, k, v, p, s, v_top=None: attend.head_attention(q, k, v, p, s)),
     diffqkv_selects_on_a_held_cache),
    # the ragged harness: each head keeps its latest keys whatever the scores; one budget for every head
    (Mutant("ragged-latest-keys", compress_module, "best_keys",
            lambda scores, target, real: torch.arange(scores.shape[-1] - target, scores.shape[-1]).expand(*scores.shape[:-1], target)),
     ragged_planted_survives),
    (Mutant("ragged-first-budget-everywhere", Budget, "targets", lambda self, real, heads: [self.tokens[0]] * heads), ragged_planted_survives),
]


@pytest.mark.parametrize("mutant, check", CASES, ids=[m.name for m, _ in CASES])
def test_mutant_is_caught(rng, monkeypatch, mutant, check):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    assert_caught(monkeypatch, mutant, lambda: check(torch.Generator().manual_seed(seed)))
