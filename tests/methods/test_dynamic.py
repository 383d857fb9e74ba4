"""The dynamic family beyond the contract suite (tests/contract): selection statistics, full
budgets vs dense, clamped budgets, always-visited blocks, the estimators against their definitions."""

from __future__ import annotations

import warnings

import pytest
import torch
from contract.cases import CASES
from helpers import qkv, rel_err

import attnzoo
from attnzoo.errors import InvalidArgumentError
from attnzoo.kernels.dense import sdpa

# configs whose budget covers every key block of a 96-token input
FULL = [
    ("vertical_slash", dict(vertical_blocks=6, slash_blocks=1, block_size=16)),
    ("vertical_slash", dict(vertical_blocks=6, slash_blocks=1, block_size=16, estimate_queries="spread")),
    ("vertical_slash", dict(vertical_blocks=6, slash_blocks=1, block_size=16, vertical_columns=3)),
    ("block_sparse", dict(top_k=6, block_size=16)),
    ("block_sparse", dict(top_k=6, block_size=16, estimator="sampled_q")),
    ("hip", dict(top_k=6, block_size=16)),
    ("hip", dict(top_k=6, block_size=16, query_samples=4)),
    ("hip", dict(top_k=24, block_size=16, key_block_size=4)),
    ("hip", dict(top_k=6, block_size=16, branch_score="bound")),
    ("hip", dict(top_k=6, block_size=16, branch_score="paper")),
    ("hip", dict(top_k=6, block_size=16, candidates=3)),
    ("biformer", dict(n_win=6, topk=6)),
    ("routing", dict(num_clusters=1, block_size=16)),
    ("routing", dict(num_clusters=1, block_size=16, balanced=False)),
]
FULL_IDS = [name + "".join(f"-{o}={cfg[o]}" for o in ("estimator", "query_samples", "key_block_size", "estimate_queries", "vertical_columns", "branch_score", "candidates", "balanced") if o in cfg) for name, cfg in FULL]
CLAMPED = [c for c in FULL if c[0] != "routing"]  # routing's budget is a cluster count: 1 is dense
CLAMPED_IDS = [i for i, c in zip(FULL_IDS, FULL) if c in CLAMPED]
SELECTING = [case for case in CASES if "dynamic" in case.info.family and "linear" not in case.info.family]


def modes(m):
    return [c for c in (True, False) if (m.info.causal if c else m.info.non_causal)]


@pytest.mark.parametrize("case", SELECTING, ids=[c.id for c in SELECTING])
def test_selection_is_sparse_and_timed(case, rng):
    """A content selection computes part of the score matrix and reports how long choosing it took."""
    m = case.make()
    q, k, v = case.inputs(rng)
    for causal in case.causal_flags:
        _, stats = m(q, k, v, causal=causal, return_stats=True)
        assert 0 < stats.density < 1 and stats.selection_ms > 0 and stats.attention_ms > 0, causal


@pytest.mark.parametrize("name,full", FULL, ids=FULL_IDS)
def test_budget_covering_everything_equals_dense(name, full, rng):
    m = attnzoo.get_method(name, **full)
    q, k, v = qkv(rng, Nq=96, D=16)
    for causal in modes(m):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, stats = m(q, k, v, causal=causal, return_stats=True)
        assert rel_err(out, sdpa(q, k, v, causal=causal, scale=16 ** -0.5)) <= 1e-5
        assert stats.density == pytest.approx(1.0)


@pytest.mark.parametrize("name,full", CLAMPED, ids=CLAMPED_IDS)
def test_budget_beyond_the_blocks_is_clamped_with_a_warning(name, full, rng):
    larger = {key: (val * 10 if isinstance(val, int) and key not in ("block_size", "key_block_size", "n_win") else val) for key, val in full.items()}
    m = attnzoo.get_method(name, **larger)
    q, k, v = qkv(rng, Nq=96, D=16)
    causal = m.info.causal
    with pytest.warns(UserWarning, match=f"exceeds the {96 // full.get('key_block_size', full.get('block_size', 16))} key blocks"):
        out = m(q, k, v, causal=causal)
    assert rel_err(out, sdpa(q, k, v, causal=causal, scale=16 ** -0.5)) <= 1e-5


@pytest.mark.parametrize("name,cfg", [
    ("block_sparse", dict(top_k=4)), ("block_sparse", dict(top_k=4, estimator="sampled_q")),
    ("hip", dict(top_k=1)), ("hip", dict(top_k=1, query_samples=2)), ("hip", dict(top_k=1, branch_score="bound")),
    ("hip", dict(top_k=1, candidates=4)), ("vertical_slash", dict(vertical_blocks=1, slash_blocks=3)),
])
def test_local_blocks_are_always_visited(name, cfg, rng):
    """Whatever the content, a causal query block visits its diagonal block, block 0 and the
    ``local_blocks`` blocks before the diagonal."""
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, Nq=160, D=8)
    layout = attnzoo.get_method(name, block_size=16, local_blocks=2, **cfg).selection(q, k, v, causal=True)
    for h in range(2):
        for qb in range(10):
            visited = set(layout.kv_indices[0, h, qb, : int(layout.kv_counts[0, h, qb])].tolist())
            assert {0, *range(max(0, qb - 2), qb + 1)} <= visited, (name, h, qb, visited, rng.initial_seed())


def test_sampled_q_finds_a_strong_key_that_key_pooling_hides(rng):
    """One key aligned with every query inside a block of keys pointing the other way: the block's
    mean key scores low, but the softmax mass of the pooled query lands on it."""
    q, k, v = qkv(rng, B=1, Hq=1, Hkv=1, Nq=128, D=16)
    direction = torch.nn.functional.normalize(torch.randn(16, generator=rng), dim=0)
    q = q * 0.1 + direction * 3
    k = k * 0.1
    k[0, 0, 64:80] = -direction * 2  # key block 4 (of 16 tokens), mostly against the queries
    k[0, 0, 70] = direction * 6  # ... but with one strong key
    picks = {}
    for estimator in ("pooled_qk", "sampled_q"):
        layout = attnzoo.get_method("block_sparse", top_k=3, block_size=16, local_blocks=0, estimator=estimator).selection(q, k, v, causal=True)
        picks[estimator] = set(layout.kv_indices[0, 0, -1, : int(layout.kv_counts[0, 0, -1])].tolist())
    assert 4 in picks["sampled_q"] and 4 not in picks["pooled_qk"], (picks, rng.initial_seed())


@pytest.mark.parametrize("nq", [64, 50])
def test_sampled_q_with_every_query_sampled_is_the_exact_block_mass(nq, rng):
    """samples = block_size: the estimate is the exact causal attention mass per (query block, key
    block) tile, GQA and bottom-right aligned cross lengths included."""
    from attnzoo.methods.dynamic.scoring import sampled_query_mass
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=nq, Nk=64, D=8)
    m = attnzoo.get_method("block_sparse", block_size=16)
    call = m._prepare(q, k, v, True, None)
    got = sampled_query_mass(q, k, call, 16, 16, samples=16)
    probs = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 8 ** -0.5).masked_fill(
        ~torch.ones(64, 64, dtype=torch.bool).tril()[64 - nq :], float("-inf")), -1)
    rows = torch.nn.functional.pad(probs, (0, 0, 0, -nq % 16)).unflatten(2, (-1, 16)).sum(3)
    want = rows.unflatten(-1, (4, 16)).sum(-1)
    want[:, :, nq // 16 :] *= 16 // (nq % 16 or 16)  # a short last block samples each query equally often
    visible = torch.isfinite(got)
    assert torch.allclose(got[visible], want[visible], atol=1e-5), rng.initial_seed()
    assert nq < 64 or not visible[:, :, 0, 1:].any()  # self-attention: the first query block sees key block 0 only


@pytest.mark.parametrize("nq", [64, 50])
def test_listed_block_mass_is_the_softmax_over_the_listed_keys(nq, rng):
    """Each sampled query's softmax runs over the keys of its query block's listed blocks only
    (holes and causally hidden keys excluded), summed per listed block and over the samples."""
    from attnzoo.methods.dynamic.scoring import listed_block_mass, sample_rows
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=nq, Nk=64, D=8)
    call = attnzoo.get_method("hip", block_size=16)._prepare(q, k, v, True, None)
    nqb = -(-nq // 16)
    blocks = torch.randint(0, 4, (2, 4, nqb, 3), generator=rng)
    blocks[..., 1] = (blocks[..., 0] + 1) % 4
    blocks[..., 2] = -1  # a hole
    blocks[0, 0, 0, 1] = 3  # a block wholly after the first query block: hidden from every sample
    got = listed_block_mass(q, k, call, blocks, 16, 16, samples=3)
    rows = sample_rows(call, 16, 3)
    logits = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 8 ** -0.5
    want = torch.zeros_like(got)
    for b in range(2):
        for h in range(4):
            for qb in range(nqb):
                listed = blocks[b, h, qb]
                keys = torch.cat([torch.arange(16 * i, 16 * i + 16) for i in listed.tolist() if i >= 0])
                for row in rows[qb].tolist():
                    seen = keys[keys <= row + 64 - nq]
                    probs = torch.softmax(logits[b, h, row, seen], -1)
                    for j, i in enumerate(listed.tolist()):
                        want[b, h, qb, j] += probs[(seen >= 16 * i) & (seen < 16 * i + 16)].sum() if i >= 0 else 0
    assert torch.allclose(got, want, atol=1e-5), rng.initial_seed()
    assert nq < 64 or got[0, 0, 0, 1] == 0


def test_hip_rerank_over_every_block_is_block_sparse_sampled_q(rng):
    """With ``candidates`` large enough for the search to keep every block, hip's re-ranking keeps
    the same blocks as block_sparse's sampled-query estimator with as many samples (which counts the
    always-visited blocks inside its top_k)."""
    from attnzoo.methods.dynamic.scoring import unique_blocks
    q, k, v = qkv(rng, B=2, Hq=4, Hkv=2, Nq=300, D=32)
    for causal, forced in ((True, 3), (False, 1)):
        hip = attnzoo.get_method("hip", top_k=4, block_size=16, candidates=100, rerank_samples=3).selection(q, k, v, causal=causal)
        bs = attnzoo.get_method("block_sparse", top_k=4 + forced, block_size=16, estimator="sampled_q", samples=3).selection(q, k, v, causal=causal)
        assert torch.equal(hip.kv_counts, bs.kv_counts), (causal, rng.initial_seed())
        assert torch.equal(unique_blocks(hip.kv_indices), unique_blocks(bs.kv_indices)), (causal, rng.initial_seed())


def test_biformer_routes_regions_of_a_2d_grid(rng):
    """Regions are n_win x n_win tiles of the grid: every query of a tile sees the same key tokens."""
    m = attnzoo.get_method("biformer", n_win=2, topk=1, grid=(4, 6))
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=2, Nq=24, D=8)
    support = m.support(q, k, v)[0, 0]
    top_left = [0, 1, 2, 6, 7, 8]  # the 2 x 3 tile at the top left of the 4 x 6 grid
    assert all(torch.equal(support[i], support[top_left[0]]) for i in top_left)
    assert int(support[0].sum()) == 6  # one routed region of 2 x 3 tokens
    routed = torch.nonzero(support[0]).flatten().tolist()
    assert routed in ([0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11], [12, 13, 14, 18, 19, 20], [15, 16, 17, 21, 22, 23])
    assert rel_err(m(q, k, v), m.reference(q, k, v)) <= 1e-5
    with pytest.raises(InvalidArgumentError, match="n_win"):
        attnzoo.get_method("biformer", n_win=4, grid=(4, 6))(q, k, v)


@pytest.mark.parametrize("queries", ["last", "spread"])
def test_vertical_slash_estimate_follows_the_definition(queries, rng):
    """Vertical mass per key column and slash mass per diagonal (query position - key position) of
    the estimating queries' causal attention (the last 12, or 12 spread over the sequence), against
    plain loops."""
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, Nq=60, D=8)
    m = attnzoo.get_method("vertical_slash", last_q=12, block_size=8, estimate_queries=queries)
    vertical, slash = m.estimate(q, k, m._prepare(q, k, v, True, None))
    positions = list(range(48, 60)) if queries == "last" else torch.linspace(0, 59, 12).round().long().tolist()
    want_v, want_s = torch.zeros(1, 2, 60), torch.zeros(1, 2, 60)
    for p in positions:
        probs = torch.softmax((q[:, :, p : p + 1] @ k[:, :, : p + 1].transpose(-1, -2))[:, :, 0] * 8 ** -0.5, -1)  # (1, 2, p + 1)
        for key in range(p + 1):
            want_v[..., key] += probs[..., key]
            want_s[..., p - key] += probs[..., key]
    assert torch.allclose(slash, want_s, atol=1e-6) and torch.allclose(vertical, want_v, atol=1e-6), rng.initial_seed()


def test_vertical_columns_are_the_heaviest_single_keys(rng):
    """Two keys that every query attends to strongly, inside blocks the pattern does not pick:
    with two vertical columns both are visited by every later query, and nothing else is added."""
    q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, Nq=128, D=16)
    direction = torch.nn.functional.normalize(torch.randn(16, generator=rng), dim=0)
    q = q * 0.1 + direction * 3
    k = k * 0.1
    k[0, 0, [37, 70]] = direction * 4
    cfg = dict(vertical_blocks=1, slash_blocks=1, block_size=16, last_q=16, local_blocks=0)
    plain = attnzoo.get_method("vertical_slash", **cfg)
    lined = attnzoo.get_method("vertical_slash", vertical_columns=2, **cfg)
    layout = lined.selection(q, k, v, causal=True)
    assert sorted(layout.columns[0, 0].tolist()) == [37, 70], rng.initial_seed()
    added = lined.support(q, k, v, causal=True) & ~plain.support(q, k, v, causal=True)
    rows = torch.arange(128)[:, None]
    want = torch.zeros(128, 128, dtype=torch.bool)
    want[:, [37, 70]] = rows >= (torch.tensor([37, 70]) // 16 + 1) * 16  # later query blocks; its own block is the diagonal
    assert torch.equal(added[0, 0], want)
    assert rel_err(lined(q, k, v, causal=True), lined.reference(q, k, v, causal=True)) <= 1e-5


@pytest.mark.parametrize("samples", [0, 3])
def test_hip_bound_is_an_upper_bound_of_every_logit_in_the_branch(samples, rng):
    """For any range of key blocks, the bound score is at least the largest logit between the
    queries and any key of the range, and equals it for a range of one single-token block."""
    from attnzoo.methods.dynamic.hip import _BoundScore
    B, H, nkb, bk, D, r = 1, 2, 13, 3, 8, max(samples, 1)
    kp = torch.randn(B, H, nkb, bk, D, generator=rng)
    first = (torch.arange(H) * nkb).view(1, H, 1, 1)
    qp = torch.randn(B, H, 1, r, D, generator=rng)
    starts = torch.randint(0, nkb, (B, H, 1, 20), generator=rng)
    ends = (starts + torch.randint(1, nkb, (B, H, 1, 20), generator=rng)).clamp(max=nkb)
    got = _BoundScore(kp, first, nkb)(qp, None, starts, ends)
    for h in range(H):
        for i in range(20):
            keys = kp[0, h, int(starts[0, h, 0, i]) : int(ends[0, h, 0, i])].flatten(0, 1)
            assert float(got[0, h, 0, i]) >= float((qp[0, h, 0] @ keys.T).max()) - 1e-5
    single = _BoundScore(kp[..., :1, :], first, nkb)(qp, None, starts, starts + 1)
    exact = torch.stack([(qp[0, h, 0] @ kp[0, h, starts[0, h, 0], 0].T).amax(0) for h in range(H)])[None, :, None]
    assert torch.allclose(single, exact, atol=1e-5)


def test_hip_bound_finds_a_lone_key_among_identical_ones(rng):
    """Keys that are all the same except one strong key: every representative of a branch scores
    the same, but the bound of the branch holding the strong key is higher at every level, so
    every later query block finds it with one branch."""
    q, k, v = qkv(rng, B=1, Hq=1, Hkv=1, Nq=512, D=16)
    direction = torch.nn.functional.normalize(torch.randn(16, generator=rng), dim=0)
    q = q * 0.1 + direction
    k = torch.zeros_like(k) + torch.randn(16, generator=rng) * 0.1
    k[0, 0, 211] = direction * 5  # key block 13
    layout = attnzoo.get_method("hip", top_k=1, block_size=16, local_blocks=0, branch_score="bound").selection(q, k, v, causal=True)
    for qb in range(14, 32):
        assert 13 in layout.kv_indices[0, 0, qb, : int(layout.kv_counts[0, 0, qb])].tolist(), qb


@pytest.mark.parametrize("nk", [None, 80])
def test_routing_with_argmax_clusters_runs_its_reference(nk, rng):
    """``balanced=False`` (every token in its nearest cluster only) still runs on the executor as its
    reference says, self and cross attention."""
    m = attnzoo.get_method("routing", num_clusters=3, block_size=16, balanced=False)
    q, k, v = qkv(rng, Nq=64, Nk=nk, D=16)
    for causal in (True, False):
        assert rel_err(m(q, k, v, causal=causal), m.reference(q, k, v, causal=causal)) <= 1e-5, causal


def test_routing_options_are_checked():
    with pytest.raises(InvalidArgumentError, match="window"):
        attnzoo.get_method("routing", window=0)
    with pytest.raises(InvalidArgumentError, match="balanced"):
        attnzoo.get_method("routing", balanced="yes")
    with pytest.raises(InvalidArgumentError, match="num_clusters"):
        attnzoo.get_method("routing", num_clusters=63)


def test_hip_pooled_score_takes_no_query_samples():
    with pytest.raises(InvalidArgumentError, match="query_samples"):
        attnzoo.get_method("hip", branch_score="pooled", query_samples=4)
    with pytest.raises(InvalidArgumentError, match="branch_score"):
        attnzoo.get_method("hip", branch_score="representative")


def test_sgformer_reallocation_is_checked():
    with pytest.raises(InvalidArgumentError, match="reallocation"):
        attnzoo.get_method("sgformer", reallocation="sorted")
