"""One prefill, several budgets (attnzoo.eval.generation.keep_all / cut, Compression.cut): the cut
of one keep-everything prefill equals a separate prefill under each ratio, token for token, on a
tiny random-init llama; and so does a dense prefix shared by the policies that read only the
latest queries."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import InvalidArgumentError

transformers = pytest.importorskip("transformers")
from cache.test_compress import POLICIES, VOCAB, tiny_llama

from attnzoo.eval.generation import Prefill, cut, greedy, keep_all, prefill

N, NEW, RATIOS = 48, 6, (0.5, 0.25)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def held(cache) -> list[tuple[torch.Tensor, ...]]:
    """What each layer holds: keys, values, kept positions, accumulated scores."""
    return [(layer.keys, layer.values, layer.positions, layer.accumulated) for layer in cache.layers]


def separate_run(model, name, config, ids, ratio) -> tuple[list[int], Prefill]:
    """The plain way: the prompt prefilled under the ratio, then greedy decoding inside it."""
    with attnzoo.compress(model, name, ratio=ratio, **config):
        start = prefill(model, ids)
        return greedy(model, start, NEW), start


def decoded_cut(model, name, config, full, ratio) -> tuple[list[int], Prefill]:
    small = cut(model, name, full, ratio, **config)
    with attnzoo.compress(model, name, ratio=ratio, **config):
        return greedy(model, small, NEW), small


def assert_same(got: Prefill, want: Prefill, exact: bool) -> None:
    for mine, theirs in zip(held(got.cache), held(want.cache), strict=True):
        assert torch.equal(mine[2], theirs[2])  # the same kept tokens on every head
        for a, b in zip(mine[:2] + mine[3:], theirs[:2] + theirs[3:]):
            if a is None or b is None:
                assert a is None and b is None
            elif exact:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, config", POLICIES)
def test_one_prefill_cut_to_each_ratio_equals_separate_runs(rng, llama, name, config):
    ids = torch.randint(0, VOCAB, (1, N), generator=rng)
    full = keep_all(llama, name, ids, **config)
    before = [t.clone() for t in held(full.cache)[0] if t is not None]
    kept = {}
    for ratio in RATIOS:
        want_tokens, want = separate_run(llama, name, config, ids, ratio)
        got_tokens, got = decoded_cut(llama, name, config, full, ratio)
        assert got_tokens == want_tokens
        assert_same(got, want, exact=True)
        kept[ratio] = got.cache.layers[0].positions
    assert kept[0.5].shape[-1] > kept[0.25].shape[-1]  # the ratios really differ
    assert all(torch.equal(a, b) for a, b in zip(before, [t for t in held(full.cache)[0] if t is not None]))  # full unchanged


@pytest.mark.parametrize("name, config", [p for p in POLICIES if p[0] in ("snapkv", "streaming_llm")])
def test_a_shared_dense_prefix_gives_the_same_cut(rng, llama, name, config):
    ids = torch.randint(0, VOCAB, (1, N), generator=rng)
    prefix = prefill(llama, ids[:, :N - 8])
    full = keep_all(llama, name, ids, dense_prefix=prefix, **config)
    assert prefix.cache.get_seq_length() == N - 8  # the shared prefix is not extended
    for ratio in RATIOS:
        want_tokens, want = separate_run(llama, name, config, ids, ratio)
        got_tokens, got = decoded_cut(llama, name, config, full, ratio)
        assert got_tokens == want_tokens
        assert_same(got, want, exact=False)  # the prompt in two calls: equal up to rounding


def test_what_cannot_be_shared_or_cut_is_refused(rng, llama):
    ids = torch.randint(0, VOCAB, (1, N), generator=rng)
    prefix = prefill(llama, ids[:, :N - 2])
    with pytest.raises(InvalidArgumentError, match="dense_prefix"):
        keep_all(llama, "h2o", ids, dense_prefix=prefix)  # cumulative: reads every query
    with pytest.raises(InvalidArgumentError, match="dense_prefix"):
        keep_all(llama, "snapkv", ids, dense_prefix=prefix, window=4)  # its window reaches into the prefix
    with attnzoo.compress(llama, "snapkv", ratio=0.5, window=4):
        compressed = prefill(llama, ids)
    with pytest.raises(InvalidArgumentError, match="cache"):
        cut(llama, "snapkv", compressed, 0.25, window=4)  # already compressed: the evicted keys are gone
    full = keep_all(llama, "snapkv", ids, window=4)
    with pytest.raises(InvalidArgumentError, match="cache"):
        cut(llama, "snapkv", full, 0.25, window=8)  # another policy's state
    with pytest.raises(InvalidArgumentError, match="cache"):
        cut(llama, "snapkv", prefix, 0.25, window=4)  # a dense cache
