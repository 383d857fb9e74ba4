"""Group C modules of issue 19 (MIL, recommendation, adapters, metric learning, scanpaths): shapes, dtypes,
gradients, torch.compile, state-dict round trips, bad input, and one known answer per module with a
mutant it catches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo import modules
from attnzoo.errors import InvalidArgumentError
from attnzoo.modules.acmil import ACMIL
from attnzoo.modules.dynamic_subspace_learner import DynamicSubspaceLearner
from attnzoo.modules.object_scanpath_transformer import ObjectScanpathTransformer
from attnzoo.modules.p_laplacian_adapter import PLaplacianAdapter


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def _acmil_inputs(gen, dtype):
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    return (_randn(gen, 2, 9, 12, dtype=dtype), mask), {}


def _dare_inputs(gen, dtype):
    history = torch.randint(0, 40, (2, 11), generator=gen)
    mask = torch.rand(2, 11, generator=gen) > 0.3
    kwargs = dict(target_categories=torch.tensor([1, 4]), history_categories=torch.randint(0, 6, (2, 11), generator=gen))
    return (torch.tensor([3, 17]), history, mask), kwargs


def _padapter_inputs(gen, dtype):
    attention = torch.softmax(_randn(gen, 2, 2, 5, 7) * 2, dim=-1).to(dtype)
    return (_randn(gen, 2, 5, 16, dtype=dtype), _randn(gen, 2, 5, 16, dtype=dtype), _randn(gen, 2, 7, 16, dtype=dtype),
            attention), {}


def _dsl_inputs(gen, dtype):
    return (_randn(gen, 2, 32, 5, 6, dtype=dtype),), {}


def _oat_inputs(gen, dtype):
    return (_randn(gen, 2, 6, 10, dtype=dtype), torch.rand(2, 6, 2, generator=gen).to(dtype), _randn(gen, 2, 10, dtype=dtype),
            torch.randint(0, 6, (2, 4), generator=gen)), {}


# name -> (tiny config, input builder, expected output shape)
CASES = {
    "ACMIL": (dict(in_dim=12, num_classes=3, hidden_dim=8, attention_dim=8, num_branches=3, top_k=4), _acmil_inputs, (2, 3)),
    "DecoupledTargetAttention": (dict(num_items=40, num_categories=6, attention_dim=4, representation_dim=6, top_k=5,
                                      mlp_dims=(8,)), _dare_inputs, (2,)),
    "PLaplacianAdapter": (dict(dim=16, num_heads=2, reduction=4), _padapter_inputs, (2, 5, 16)),
    "DynamicSubspaceLearner": (dict(in_channels=32, embedding_dim=8, num_learners=2), _dsl_inputs, (2, 8)),
    "ObjectScanpathTransformer": (dict(feature_dim=10, dim=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                                       ffn_dim=16), _oat_inputs, (2, 5, 7)),
}
# Every module compiles with fullgraph=True: the value checks that read tensors on the host (ids in range, no
# empty bag) are skipped while torch.compile traces.


def _build(name, dtype=torch.float32):
    config, make_inputs, shape = CASES[name]
    return modules.create(name, **config).to(dtype), make_inputs, shape


def _main_output(out):
    return out.bag_logits if isinstance(out, tuple) and hasattr(out, "bag_logits") else out


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_dtypes(name, dtype, rng):
    module, make_inputs, shape = _build(name, dtype)
    args, kwargs = make_inputs(rng, dtype)
    out = _main_output(module.eval()(*args, **kwargs))
    assert out.shape == shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_reach_every_parameter(name, rng):
    module, make_inputs, _ = _build(name)
    args, kwargs = make_inputs(rng, torch.float32)
    out = module.train()(*args, **kwargs)
    loss = module.loss(out, torch.tensor([0, 2])) if name == "ACMIL" else out.float().square().sum()
    loss.backward()
    dead = [n for n, p in module.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not dead, f"no gradient reaches {dead}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_compile_matches_eager_and_state_dict_round_trips(name, rng):
    module, make_inputs, _ = _build(name)
    module.eval()
    args, kwargs = make_inputs(rng, torch.float32)
    eager = _main_output(module(*args, **kwargs))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(_main_output(compiled(*args, **kwargs)), eager, rtol=1e-5, atol=1e-5)
    fresh, _, _ = _build(name)
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(_main_output(fresh.eval()(*args, **kwargs)), eager)


def test_registered_with_paper_and_arxiv():
    infos = {i.name: i for i in modules.list_modules()}
    for name in CASES:
        assert infos[name].arxiv and infos[name].title and infos[name].family == ("module",)


# ---- bad input ----------------------------------------------------------------------------------
BAD = [
    ("ACMIL", lambda a, k: ((torch.zeros(2, 0, 12),), {}), "bags"),
    ("ACMIL", lambda a, k: ((a[0][..., :5], a[1]), {}), "bags"),
    ("ACMIL", lambda a, k: ((a[0], torch.zeros(2, 9, dtype=torch.bool)), {}), "instance_mask"),
    ("ACMIL", lambda a, k: ((a[0], a[1][:, :4]), {}), "instance_mask"),
    ("DecoupledTargetAttention", lambda a, k: ((a[0], a[1], a[2][:, :3]), k), "history_mask"),
    ("DecoupledTargetAttention", lambda a, k: ((a[0], a[1] + 40, a[2]), k), "history_items"),
    ("DecoupledTargetAttention", lambda a, k: ((a[0], a[1], a[2]), {}), "target_categories"),
    ("PLaplacianAdapter", lambda a, k: ((a[0], a[1], a[2], a[3][:, :1]), {}), "attention"),
    ("PLaplacianAdapter", lambda a, k: ((a[0], a[1][:, :2], a[2], a[3]), {}), "queries"),
    ("PLaplacianAdapter", lambda a, k: ((a[0][0], a[1], a[2], a[3]), {}), "hidden"),
    ("DynamicSubspaceLearner", lambda a, k: ((a[0][:, :16],), {}), "features"),
    ("DynamicSubspaceLearner", lambda a, k: ((a[0][0],), {}), "features"),
    ("ObjectScanpathTransformer", lambda a, k: ((a[0], a[1][..., :1], a[2], a[3]), {}), "object_positions"),
    ("ObjectScanpathTransformer", lambda a, k: ((a[0], a[1], a[2], a[3] + 6), {}), "fixations"),
    ("ObjectScanpathTransformer", lambda a, k: ((a[0][:, :0], a[1][:, :0], a[2], a[3]), {}), "object_features"),
]


@pytest.mark.parametrize("name, corrupt, argument", BAD, ids=[f"{n}-{a}-{i}" for i, (n, _, a) in enumerate(BAD)])
def test_bad_input_names_the_argument(name, corrupt, argument, rng):
    module, make_inputs, _ = _build(name)
    args, kwargs = corrupt(*make_inputs(rng, torch.float32))
    with pytest.raises(InvalidArgumentError, match=f"^{argument}: expected"):
        module(*args, **kwargs)


@pytest.mark.parametrize("name, config, argument", [
    ("ACMIL", dict(in_dim=4, mask_prob=1.0), "mask_prob"),
    ("PLaplacianAdapter", dict(dim=16, num_heads=3, reduction=4), "reduction"),
    ("DynamicSubspaceLearner", dict(in_channels=32, embedding_dim=4, num_learners=5), "num_learners"),
    ("ObjectScanpathTransformer", dict(feature_dim=4, dim=18), "dim"),
    ("DecoupledTargetAttention", dict(num_items=0), "num_items"),
])
def test_bad_config_names_the_argument(name, config, argument):
    with pytest.raises(InvalidArgumentError, match=f"^{argument}: expected"):
        modules.create(name, **config)


# ---- known answers ------------------------------------------------------------------------------
def _planted_bag(gen, n=30, planted=4):
    """One bag (1, n, 12) whose instance `planted` alone carries a large feature 0."""
    bag = torch.randn(1, n, 12, generator=gen) * 0.1
    bag[0, planted, 0] = 10.0
    return bag


def _acmil_attending(feature: int) -> ACMIL:
    """An ACMIL whose every branch scores an instance by its reduced feature `feature` (hand-set weights)."""
    m = ACMIL(12, hidden_dim=12, attention_dim=4, num_branches=3, top_k=3, mask_prob=0.6).eval()
    with torch.no_grad():
        m.reduce[0].weight.copy_(torch.eye(12))
        m.reduce[0].bias.zero_()
        m.attention_tanh.weight.zero_()
        m.attention_tanh.weight[:, feature] = 1.0
        m.attention_tanh.bias.zero_()
        m.attention_gate.weight.zero_()
        m.attention_gate.bias.fill_(20.0)  # gate ~ 1
        m.attention_out.weight.fill_(5.0)
        m.attention_out.bias.zero_()
    return m


def test_acmil_attention_picks_the_planted_instance_and_masking_moves_it(rng, monkeypatch):
    bag = _planted_bag(rng)
    m = _acmil_attending(0)
    out = m(bag)
    assert int(out.instance_scores.argmax()) == 4 and float(out.instance_scores[0, 4].detach()) > 0.9
    # STKIM with K'=3, p=0.6 masks floor(1.8)=1 of each branch's top 3 at random: over draws the planted
    # instance is masked in about 1/3 of the branches, and where it is, its weight is exactly 0.
    m.train()
    masked = torch.stack([m(bag).attention[0, :, 4] == 0 for _ in range(60)])
    assert 0.2 < float(masked.float().mean()) < 0.47
    assert int((m(bag).attention[0] == 0).sum()) == 3  # one instance per branch, never more
    # the diversity loss of identical branches is 1 and of disjoint ones 0
    same = torch.softmax(torch.randn(2, 1, 9, generator=rng), -1).expand(2, 3, 9)
    assert abs(float(m.diversity_loss(same)) - 1.0) < 1e-6
    assert float(m.diversity_loss(torch.eye(3)[None])) == 0.0
    # mutant: masking after the softmax (attention not re-allocated) leaves rows that do not sum to 1
    monkeypatch.setattr(torch, "softmax", lambda x, dim: F.softmax(x.nan_to_num(neginf=0.0), dim=dim) * (x > -1e30))
    rows = torch.stack([m(bag).attention.sum(-1) for _ in range(20)])
    assert not torch.allclose(rows, torch.ones_like(rows))


def test_acmil_padding_changes_nothing(rng):
    m = ACMIL(12, hidden_dim=8, attention_dim=8, num_branches=2).eval()
    bag = torch.randn(1, 5, 12, generator=rng)
    padded = torch.cat((bag, torch.randn(1, 3, 12, generator=rng)), dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    torch.testing.assert_close(m(padded, mask).bag_logits, m(bag).bag_logits)


def _dare_reference(m, target, history, mask):
    """DARE written out: softmax of attention-embedding dot products over valid behaviours, sum of representation embeddings."""
    q, k = m.item_attention(target), m.item_attention(history)
    logits = torch.einsum("bd,bld->bl", q, k) / math.sqrt(q.shape[-1])
    w = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    user = torch.einsum("bl,bld->bd", w, m.item_representation(history))
    t = m.item_representation(target)
    return m.mlp(torch.cat((t, user, t * user), dim=-1)).squeeze(-1), w


def test_dare_equals_its_written_out_form_and_decouples_the_tables(rng, monkeypatch):
    m = modules.create("DecoupledTargetAttention", num_items=30, attention_dim=3, representation_dim=5, mlp_dims=(7,))
    history = torch.randint(0, 30, (3, 8), generator=rng)
    mask = torch.rand(3, 8, generator=rng) > 0.4
    mask[2] = False  # a user without history
    target = torch.tensor([1, 2, 3])
    logits, weights = m(target, history, mask, return_attention=True)
    ref_logits, ref_weights = _dare_reference(m, target, history, mask)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    # the attention weights depend on the attention table only
    with torch.no_grad():
        m.item_representation.weight.normal_()
    torch.testing.assert_close(m(target, history, mask, return_attention=True)[1], weights)
    # mutant: scoring with the representation table (a shared embedding) is caught
    monkeypatch.setattr(m, "item_attention", m.item_representation)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(m(target, history, mask, return_attention=True)[1], weights)


def test_dare_top_k_keeps_the_best_scoring_behaviours(rng):
    m = modules.create("DecoupledTargetAttention", num_items=30, attention_dim=3, representation_dim=4, top_k=2, mlp_dims=())
    history = torch.randint(0, 30, (2, 9), generator=rng)
    mask = torch.ones(2, 9, dtype=torch.bool)
    _, weights = m(torch.tensor([5, 6]), history, mask, return_attention=True)
    assert ((weights > 0).sum(-1) == 2).all()
    scores = torch.einsum("bd,bld->bl", m.item_attention(torch.tensor([5, 6])), m.item_attention(history))
    kept = weights > 0
    assert (scores[kept].view(2, 2).min(-1).values >= scores.masked_fill(kept, -1e9).max(-1).values).all()


def test_p_adapter_at_p2_mu0_is_the_attention_itself(rng):
    m = PLaplacianAdapter(16, 2, reduction=2, p=2.0, mu=0.0)
    q, v = torch.randn(2, 2, 5, 4, generator=rng), torch.randn(2, 2, 7, 4, generator=rng)
    a = torch.softmax(torch.randn(2, 2, 5, 7, generator=rng), dim=-1)
    torch.testing.assert_close(m.message(q, v, a), a @ v)
    # p < 2 moves weight to the nearer neighbours: the row of a query equal to one value favours that value
    m_low = PLaplacianAdapter(16, 2, reduction=2, p=1.0, mu=0.0)
    q_on_v0 = v[:, :, :1].expand(-1, -1, 5, -1)
    out = m_low.message(q_on_v0, v, torch.full_like(a, 1 / 7))
    assert ((out - v[:, :, :1]).norm(dim=-1) < (a.new_full((), 1 / 7) * v.sum(2, keepdim=True) - v[:, :, :1]).norm(dim=-1)).all()
    # with mu > 0 at p = 2 the query's own feature enters with weight mu' / (1 + mu'), mu' = 2 mu0 (2 + tanh 0) / 2
    m_mu = PLaplacianAdapter(16, 2, reduction=2, p=2.0, mu=0.25)
    torch.testing.assert_close(m_mu.message(q, v, a), (a @ v + 0.5 * q) / 1.5)
    # the general p against the edge-by-edge loop, and a mutant that ignores p (plain attention) is caught
    ref_low = _p_message_loop(q, v, a, p=1.0, eps=1e-8)
    torch.testing.assert_close(m_low.message(q, v, a), ref_low, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        m_low.p.fill_(2.0)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(m_low.message(q, v, a), ref_low, rtol=1e-4, atol=1e-5)


def _p_message_loop(q, v, a, *, p, eps):
    """The p-Laplacian step edge by edge, in float64: w_ij = a_ij (a_ij |q_i - v_j|^2 + eps)^((p-2)/2), no self term."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for idx in torch.cartesian_prod(*(torch.arange(s) for s in q.shape[:3])):
        b, h, i = idx.tolist()
        w = torch.stack([a[b, h, i, j].double() * (a[b, h, i, j].double() * (q[b, h, i] - v[b, h, j]).double().square().sum()
                                                    + eps) ** ((p - 2) / 2) for j in range(v.shape[2])])
        out[b, h, i] = (w[:, None] * v[b, h].double()).sum(0) / w.sum()
    return out.float()


def test_p_adapter_with_a_zero_up_projection_is_the_identity(rng):
    m = PLaplacianAdapter(16, 2, reduction=4)
    args, _ = _padapter_inputs(rng, torch.float32)
    with torch.no_grad():
        m.up.weight.zero_()
        m.up.bias.zero_()
    assert torch.equal(m(*args), args[0])


def test_dsl_with_a_neutral_attention_map_is_pooled_embedding_normalised_per_learner(rng, monkeypatch):
    m = DynamicSubspaceLearner(32, embedding_dim=8, num_learners=2).eval()
    with torch.no_grad():
        m.attention_map[4].weight.zero_()
        m.attention_map[4].bias.zero_()  # sigmoid(0) = 0.5 everywhere
    x = torch.randn(3, 32, 4, 5, generator=rng)
    raw = m.embedding(0.5 * x.mean(dim=(2, 3)))
    expected = torch.cat((F.normalize(raw[:, :4], dim=1), F.normalize(raw[:, 4:], dim=1)), dim=1)
    out, attention = m(x, return_attention=True)
    assert torch.equal(attention, torch.full_like(attention, 0.5))
    torch.testing.assert_close(out, expected)
    # mutant: one norm over the whole embedding instead of one per learner
    monkeypatch.setattr(m, "normalize_learners", lambda e: F.normalize(e, dim=1))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(m(x), expected)


def test_dsl_grow_moves_the_important_neurons_into_a_new_learner(rng):
    m = DynamicSubspaceLearner(32, embedding_dim=8, num_learners=1)
    before = m.embedding.weight.detach().clone()
    acts, grads = torch.randn(20, 8, generator=rng), torch.randn(20, 8, generator=rng) * 0.01
    grads[:, [2, 6]] = acts[:, [2, 6]]  # neurons 2 and 6 matter
    scores = m.taylor_scores(acts, grads)
    assert scores.min() == 0 and scores.max() == 1
    assert m.grow(scores) == 2 and m.num_learners == 2
    assert m.learner_of.tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    chosen = scores.argsort(descending=True)[:2]
    torch.testing.assert_close(m.embedding.weight[:2], before[chosen])
    out = m(torch.randn(2, 32, 3, 3, generator=rng))
    torch.testing.assert_close(out[:, :2].norm(dim=1), torch.ones(2))
    torch.testing.assert_close(out[:, 2:].norm(dim=1), torch.ones(2))
    with pytest.raises(InvalidArgumentError, match="^scores: expected"):
        m.grow(torch.zeros(8))  # nothing above the threshold


def test_oat_object_encoding_depends_on_displacement_only(rng, monkeypatch):
    m = ObjectScanpathTransformer(4, dim=64, position_scale=0.5)
    a, b = torch.rand(6, 2, generator=rng), torch.rand(6, 2, generator=rng)
    shift = torch.randn(1, 2, generator=rng)
    dot = (m.position_encoding(a) * m.position_encoding(b)).sum(-1)
    torch.testing.assert_close((m.position_encoding(a + shift) * m.position_encoding(b + shift)).sum(-1), dot)
    expected = torch.cos((a - b) @ m.frequencies).mean(-1)  # (1/m) sum_f cos(w_f . (a - b))
    torch.testing.assert_close(dot, expected)
    assert torch.allclose((m.position_encoding(a) ** 2).sum(-1), torch.ones(6))
    # mutant: sine-only features lose translation invariance
    monkeypatch.setattr(m, "position_encoding", lambda p: torch.cat(((p @ m.frequencies).sin(),) * 2, -1) / math.sqrt(16))
    shifted = (m.position_encoding(a + shift) * m.position_encoding(b + shift)).sum(-1)
    assert not torch.allclose(shifted, (m.position_encoding(a) * m.position_encoding(b)).sum(-1))


def test_oat_is_causal_over_fixations(rng, monkeypatch):
    m = ObjectScanpathTransformer(10, **{k: v for k, v in CASES["ObjectScanpathTransformer"][0].items() if k != "feature_dim"}).eval()
    args, _ = _oat_inputs(rng, torch.float32)
    changed = args[3].clone()
    changed[:, -1] = (changed[:, -1] + 1) % 6
    first, second = m(*args), m(*args[:3], changed)
    torch.testing.assert_close(first[:, :4], second[:, :4])  # rows 0..3 see fixations before t only
    assert not torch.allclose(first[:, 4], second[:, 4])
    # mutant: a decoder whose self-attention is not causal sees the future
    for block in m.decoder:
        monkeypatch.setattr(block.self_attn, "causal", False)
    assert not torch.allclose(m(*args)[:, :4], m(*args[:3], changed)[:, :4])
