"""analysis.record on tiny models (patched and not) and rollout / attention flow / VL-SAM flow."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from analysis.tiny_models import N, ids, tiny

import attnzoo
from attnzoo import InvalidArgumentError, UnsupportedError
from attnzoo.analysis import (
    attention_flow,
    fuse_heads,
    max_flow,
    record,
    regularized_flow,
    rollout,
    to_image_grid,
)

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_record_matches_eager_weights_and_keeps_qkv(family, rng):
    model, x = tiny(family), ids(rng, B=2)
    rec = record(model, x, qkv=True)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(input_ids=x, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    assert rec.layers == [0, 1] and rec.causal == (family == "llama")
    for got, want in zip(rec.probs, eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert rec.q[0].shape == (2, 4, N, 8) and rec.k[0].shape[1] == (2 if family == "llama" else 4)
    assert rec.layer(1) is rec.probs[1]


def test_record_on_a_patched_model_reports_what_the_method_keeps(rng):
    model = tiny("llama")
    attnzoo.patch(model, attnzoo.get_method("sliding_window", window=3))
    try:
        rec = record(model, ids(rng), layers=[1])
    finally:
        attnzoo.unpatch(model)
    p = rec.layer(1)[0]
    far = torch.ones(N, N, dtype=torch.bool).tril(-3)  # keys 3 or more behind the query
    assert p[:, far].abs().max() == 0 and torch.allclose(p.sum(-1), torch.ones(4, N), atol=1e-5)
    assert rec.plans[0] is not None


def test_record_bad_input(rng):
    model = tiny("llama")
    with pytest.raises(InvalidArgumentError, match="layers"):
        record(model, ids(rng), layers=[2])
    with pytest.raises(InvalidArgumentError, match="context length"):
        record(model, ids(rng, n=33))
    with pytest.raises(InvalidArgumentError, match="tokenizer"):
        record(model, "some text")
    with pytest.raises(InvalidArgumentError, match="model"):
        record(torch.nn.Linear(2, 2), ids(rng))


def test_record_refuses_a_model_whose_attention_it_cannot_read(rng):
    """XLNet writes its attention inline (no attention interface): nothing to capture."""
    config = transformers.XLNetConfig(n_layer=1, n_head=2, d_model=16, d_inner=32, vocab_size=97)
    with pytest.raises(UnsupportedError, match="attention"):
        record(transformers.XLNetLMHeadModel(config).eval(), ids(rng))


def random_maps(rng, L=3, B=2, H=3, n=6, causal=True):
    logits = torch.randn(L, B, H, n, n, generator=rng)
    if causal:
        logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return list(logits.softmax(-1))


@pytest.mark.parametrize("fusion", ["mean", "max", "min", "vlsam"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.5])
def test_rollout_rows_sum_to_one_and_equal_a_loop_product(rng, fusion, discard_ratio):
    maps = random_maps(rng, causal=False)
    out = rollout(maps, fusion=fusion, discard_ratio=discard_ratio)
    assert torch.allclose(out.sum(-1), torch.ones(2, 6), atol=1e-5)
    reduce = {"mean": np.mean, "max": np.max, "min": np.min}
    for b in range(2):
        joint = np.eye(6)
        for m in maps:
            p = m[b].double().numpy()
            if fusion == "vlsam":
                weights = [p[h].max(axis=1).mean() for h in range(3)]  # per query the top key weight, mean over queries
                a = sum(w * p[h] for h, w in enumerate(weights)) / 3
            else:
                a = reduce[fusion](p, axis=0)
            for i in range(6):
                order = [j for j in np.argsort(a[i], kind="stable") if j != i][: int(discard_ratio * 6)]
                a[i, order] = 0.0
            a = 0.5 * a + 0.5 * np.eye(6)
            a = a / a.sum(axis=1, keepdims=True)
            joint = a @ joint
        np.testing.assert_allclose(out[b].numpy(), joint, rtol=1e-4, atol=1e-6)


def brute_min_cut(cap: np.ndarray, s: int, t: int) -> float:
    """Smallest capacity over every s-t cut, by enumeration (small graphs only)."""
    others = [v for v in range(len(cap)) if v not in (s, t)]
    best = np.inf
    for bits in itertools.product([0, 1], repeat=len(others)):
        side = {s} | {v for v, bit in zip(others, bits) if bit}
        best = min(best, sum(cap[u, v] for u in side for v in range(len(cap)) if v not in side))
    return best


def test_max_flow_respects_capacities_and_equals_the_min_cut(rng):
    for _ in range(5):
        cap = torch.rand(8, 8, generator=rng).numpy() * (torch.rand(8, 8, generator=rng).numpy() < 0.5)
        np.fill_diagonal(cap, 0.0)
        value, flow = max_flow(cap, 0, 7)
        assert (flow <= cap + 1e-12).all() and (flow >= 0).all()
        net = flow.sum(axis=1) - flow.sum(axis=0)
        np.testing.assert_allclose(net[1:7], 0.0, atol=1e-12)
        assert value == pytest.approx(brute_min_cut(cap, 0, 7), abs=1e-9)


def test_attention_flow_is_bounded_by_the_fused_capacities(rng):
    maps = random_maps(rng, L=2, B=1, n=4)
    flow = attention_flow(maps, outputs=[3, 1])
    fused = [0.5 * fuse_heads(m.double()) + 0.5 * torch.eye(4, dtype=torch.float64) for m in maps]
    for row, o in enumerate([3, 1]):
        for j in range(4):
            cap = np.zeros((12, 12))
            cap[8:12, 4:8], cap[4:8, 0:4] = fused[1][0].numpy(), fused[0][0].numpy()
            assert flow[0, row, j].item() == pytest.approx(brute_min_cut(cap, 8 + o, j), abs=1e-6)
    assert flow[0, 1, 2:].abs().max() < 1e-9  # causal: token 1 cannot reach later inputs
    with pytest.raises(InvalidArgumentError, match="outputs"):
        attention_flow(maps, outputs=[4])


def test_regularized_flow_scales_early_columns_down(rng):
    maps = random_maps(rng, L=1, B=1, n=5)
    out = regularized_flow(maps)[0]
    p = maps[0][0].double()
    weights = torch.stack([p[h].max(dim=1).values.mean() for h in range(p.shape[0])])
    a = (p * weights[:, None, None]).mean(0)
    a = a / a.sum(-1, keepdim=True)
    for j in range(5):  # causal: key j is seen by 5 - j queries
        torch.testing.assert_close(out[:, j].double(), a[:, j] * (1 - (5 - j - 1) / 5), atol=1e-6, rtol=1e-5)


def test_flow_bad_input(rng):
    maps = random_maps(rng)
    with pytest.raises(InvalidArgumentError, match="fusion"):
        rollout(maps, fusion="median")
    with pytest.raises(InvalidArgumentError, match="discard_ratio"):
        rollout(maps, discard_ratio=1.0)
    with pytest.raises(InvalidArgumentError, match="maps"):
        rollout([torch.ones(2, 3, 4)])


def test_rollout_of_a_vit_goes_onto_its_patch_grid(rng, tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=48, num_labels=3)
    model = transformers.ViTForImageClassification(config).eval()
    rec = record(model, {"pixel_values": torch.randn(1, 3, 16, 16, generator=rng)})
    assert rec.input_ids is None and rec.probs[0].shape == (1, 4, 17, 17) and not rec.causal
    cls_row = rollout(rec.probs)[:, 0]
    grid = to_image_grid(model, cls_row)
    assert grid.shape == (1, 4, 4) and torch.equal(grid.flatten(1), cls_row[:, 1:])
    with pytest.raises(InvalidArgumentError, match="values"):
        to_image_grid(model, cls_row[:, 1:])
    with pytest.raises(InvalidArgumentError, match="model"):
        to_image_grid(tiny("llama"), cls_row)
