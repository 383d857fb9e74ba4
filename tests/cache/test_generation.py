"""attnzoo.eval.generation on a tiny random-init llama: what a dense and a compressed cache hold and predict."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import InvalidArgumentError

transformers = pytest.importorskip("transformers")
from attnzoo.eval.generation import continuation_perplexity, generation_cost

VOCAB = 97


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval()


def test_cost_counts_the_bytes_the_cache_holds(rng, llama):
    ids = torch.randint(0, VOCAB, (1, 64), generator=rng)
    dense = generation_cost(llama, ids, new_tokens=4)
    # 2 layers x (keys + values) x 2 kv heads x 16 dims x float32, per cached token
    assert dense.prefill_cache_bytes == 2 * 2 * 2 * 16 * 4 * 64
    assert dense.final_cache_bytes == 2 * 2 * 2 * 16 * 4 * (64 + 4)  # every generated token is fed back
    with attnzoo.compress(llama, "streaming_llm", budget=16):
        small = generation_cost(llama, ids, new_tokens=4)
    keys_values = 2 * 2 * 2 * 16 * 4 * 16
    assert keys_values < small.prefill_cache_bytes < dense.prefill_cache_bytes / 3  # plus int32 positions and the counts
    assert small.decode_ms > 0 and small.prefill_s > 0 and len(small.tokens) == 4


def test_continuation_perplexity_is_the_dense_one_when_everything_is_kept(rng, llama):
    ids = torch.randint(0, VOCAB, (1, 80), generator=rng)
    dense = continuation_perplexity(llama, ids, context=48, continuation=32)
    with torch.no_grad():
        logits = llama(input_ids=ids).logits[0, 47:79].float()
    expected = torch.nn.functional.cross_entropy(logits, ids[0, 48:80])
    assert dense.nll == pytest.approx(float(expected), rel=1e-4)
    with attnzoo.compress(llama, "h2o", ratio=1.0):
        kept = continuation_perplexity(llama, ids, context=48, continuation=32)
    assert kept.nll == pytest.approx(dense.nll, rel=1e-5)
    with attnzoo.compress(llama, "streaming_llm", budget=8):
        cut = continuation_perplexity(llama, ids, context=48, continuation=32)
    assert cut.nll != pytest.approx(dense.nll, rel=1e-3)


def test_bad_inputs(llama):
    with pytest.raises(InvalidArgumentError):
        continuation_perplexity(llama, torch.zeros(1, 10, dtype=torch.long), context=8, continuation=8)
    with pytest.raises(InvalidArgumentError):
        generation_cost(llama, torch.zeros(2, 10, dtype=torch.long))


@pytest.mark.parametrize("argv, message", [
    (["eval", "--cache", "snapkv", "--task", "approx"], "--task"),
    (["eval", "--task", "ppl"], "--method"),
    (["eval", "--method", "dense", "--task", "cost"], "--task"),
])
def test_eval_cli_refuses_bad_combinations_before_loading_a_model(argv, message, capsys):
    from attnzoo.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_greedy_from_a_prefill_is_what_generate_returns(rng, llama):
    from attnzoo.eval.generation import greedy, prefill

    ids = torch.randint(0, VOCAB, (1, 24), generator=rng)
    want = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 24:]
    start = prefill(llama, ids)
    assert greedy(llama, start, 6) == want.tolist()
    assert start.cache.get_seq_length() == 24 + 5  # every token but the last was fed back
    stop = want[2].item()
    until = want.tolist().index(stop) + 1  # ends after the first stop token
    assert greedy(llama, prefill(llama, ids), 6, stop=stop) == want[:until].tolist()
