"""selective with subtract=True (Selective Attention's logit subtraction): prefill and decode against
the paper's pseudo-code written out over the whole sequence; pruning under it; bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import AttendWith

import attnzoo
from attnzoo import InvalidArgumentError, UnsupportedError
from attnzoo.cache import get_policy

transformers = pytest.importorskip("transformers")
from cache.test_compress import VOCAB, tiny_llama  # noqa: E402
from attnzoo.integrations.transformers.compress import SelectiveLayer  # noqa: E402


def paper_attention(head):
    """The paper's section 3 over a whole sequence: S = ReLU(head's causal logits), the first token's
    column and the diagonal zeroed, shifted one query down, summed down the queries (F); every
    head attends with softmax(logits - F)."""

    def attend(index, q, k, v, scale):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1).double(), v.repeat_interleave(groups, dim=1).double()
        n = q.shape[2]
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        logits = ((q.double() @ k.transpose(-1, -2)) * scale).masked_fill(future, float("-inf"))
        s = torch.relu(logits[:, head])
        s[..., 0] = 0
        s = s * (1 - torch.eye(n, dtype=s.dtype))
        s = torch.roll(s, 1, dims=-2)
        s[..., 0, :] = 0
        f = torch.cumsum(s, dim=-2)
        return (torch.softmax(logits - f[:, None], dim=-1) @ v).to(q.dtype)

    return attend


@pytest.mark.parametrize("heads, kv_heads, head", [(4, 2, 0), (4, 4, 3)])
@pytest.mark.parametrize("prefill_chunk", [None, 7])
def test_prefill_and_decode_match_the_paper(rng, heads, kv_heads, head, prefill_chunk):
    """A 30-token prompt prefilled under compress (the selection scored 7 query rows at a time, or
    the prompt prefilled in 7-token chunks), then 6 decode steps fed the known tokens: the logits
    equal those of one forward of the whole sequence under the paper's attention (F of a later
    query comes from the total accumulated by earlier calls)."""
    model = tiny_llama(heads, kv_heads)
    ids = torch.randint(1, VOCAB, (1, 36), generator=rng)
    with torch.no_grad(), AttendWith(model, paper_attention(head)):
        expected = model(input_ids=ids, use_cache=False).logits
    policy = get_policy("selective", head=head, chunk=7, subtract=True)
    with torch.no_grad(), attnzoo.compress(model, policy, ratio=1.0, chunk=prefill_chunk):
        out = model(input_ids=ids[:, :30], use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        got = [out.logits]
        for t in range(30, 36):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            got.append(out.logits)
    assert isinstance(cache.layers[0], SelectiveLayer)
    got = torch.cat(got, dim=1)
    expected = expected[:, 36 - got.shape[1]:]  # a chunked prefill returns its last chunk's logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits[:, 36 - got.shape[1]:]
    assert not torch.allclose(plain, expected, atol=1e-2)  # the subtraction changes what this model computes


def test_pruning_under_the_subtraction_keeps_the_first_token_and_the_budget(rng):
    model = tiny_llama()
    ids = torch.randint(1, VOCAB, (1, 40), generator=rng)
    with torch.no_grad(), attnzoo.compress(model, "selective", budget=12, interval=2, subtract=True):
        out = model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    for layer in cache.layers:
        assert 12 <= layer.keys.shape[2] < 12 + 2
        assert (layer.positions == 0).any(dim=-1).all()


def test_bad_input_names_its_argument():
    model = tiny_llama()
    with pytest.raises(InvalidArgumentError) as e:
        attnzoo.compress(model, "selective", ratio=0.5, subtract="yes")
    assert e.value.argument == "subtract"
    ids = torch.randint(1, VOCAB, (1, 12))
    with attnzoo.compress(model, "selective", ratio=0.5, subtract=True, ragged=True), pytest.raises(UnsupportedError):
        model(input_ids=ids, use_cache=True)
    with attnzoo.patch(model, "sliding_window", window=4), attnzoo.compress(model, "selective", ratio=0.5, subtract=True):
        with pytest.raises(UnsupportedError):
            model(input_ids=ids, use_cache=True)


def test_a_key_the_selecting_head_masks_is_hidden_from_every_head_after_it(rng):
    """Known answer: query 3 of head 0 puts a large logit on key 1, so from query 4 on every head
    (head 1 reads another KV head) gives key 1 almost nothing, while query 3 itself still sees it;
    without the selection (keys nothing selects) the attention to key 1 is unchanged."""
    n, d = 8, 16
    direction = torch.randn(d, generator=rng)
    queries = 0.1 * torch.randn(1, 2, n, d, generator=rng)
    keys = 0.1 * torch.randn(1, 2, n, d, generator=rng)
    queries[0, 0, 3] = 4 * direction
    keys[0, 0, 1] = 4 * direction  # head 0 (KV head 0) selects key 1 at query 3
    other = torch.randn(d, generator=rng)
    queries[0, 1, 4:] += 2 * other
    keys[0, 1, 1] = 2 * other  # head 1 would attend to key 1 from query 4 on
    values = torch.randn(1, 2, n, d, generator=rng)
    positions = torch.arange(n, dtype=torch.int32).expand(1, 2, n)
    policy = get_policy("selective", head=0, subtract=True)
    out, gained = policy.attend(queries, keys, values, positions, torch.zeros(1, n), d ** -0.5)
    plain = torch.softmax((queries @ keys.transpose(-1, -2)) * d ** -0.5 + torch.full((n, n), float("-inf")).triu(1), dim=-1)
    assert plain[0, 1, 4:, 1].min() > 0.5  # head 1 reads key 1 without the subtraction
    weights = []
    for h in range(2):  # recover each row's weight on key 1 from the output: values of key 1 are a distinct direction
        probs = torch.linalg.lstsq(values[0, h, :].T, out[0, h].T).solution.T  # (n, n) weights per row
        weights.append(probs[:, 1])
    assert all(w[4:].abs().max() < 1e-3 for w in weights), weights
    assert weights[0][3] > 0.5  # query 3 made the selection, not subject to it
    assert gained[0, 0, 1] > 10 and torch.equal(gained[0, 0], gained[0, 1])
