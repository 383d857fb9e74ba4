"""attnzoo.patch on one tiny random-init model per supported family, built from configs (offline, seconds)."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import rel_err

import attnzoo
from attnzoo import InvalidArgumentError, UnsupportedError

transformers = pytest.importorskip("transformers")
from attnzoo.integrations.transformers import LayerPlan, HeadGroup, attention_modules  # noqa: E402

T = transformers
VOCAB, N = 97, 24
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
GQA = dict(TEXT, num_key_value_heads=2)


def _gemma3(window=64):
    # query_pre_attn_scalar 24 != head_dim 16: the scale the model passes, not head_dim ** -0.5
    return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**GQA, head_dim=16, query_pre_attn_scalar=24, sliding_window=window,
                                                  layer_types=["sliding_attention", "full_attention"], pad_token_id=0))


BUILDERS = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**GQA)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**GQA, sliding_window=None)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**GQA)),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**GQA, head_dim=16)),
    "gemma3": _gemma3,
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**GQA, pad_token_id=0)),
    "bert": lambda: T.BertModel(T.BertConfig(**TEXT)),
    "roberta": lambda: T.RobertaModel(T.RobertaConfig(**TEXT)),
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                           intermediate_size=64, image_size=16, patch_size=4, num_labels=3)),
}
DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"]
ENCODERS = ["bert", "roberta"]
FAMILIES = DECODERS + ENCODERS + ["vit"]


@functools.cache
def model(family: str):
    torch.manual_seed(0)
    return BUILDERS[family]().eval()


def inputs(family: str, rng, batch: int = 1) -> dict:
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=rng)}
    return {"input_ids": torch.randint(3, VOCAB, (batch, N), generator=rng)}  # above roberta's padding id 1


@torch.no_grad()
def output(m, **kw) -> torch.Tensor:
    """Logits of a language model, else the last hidden state."""
    out = m(**kw, output_hidden_states=True)
    return out.logits if hasattr(out, "logits") and out.logits.dim() == 3 else out.hidden_states[-1]


def band(n: int, window: int, causal: bool) -> torch.Tensor:
    """(1, 1, n, n) bool: the keys of attnzoo's sliding_window(window) (causal: the window last keys)."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    if causal:
        return ((j <= i) & (i - j < window))[None, None]
    left = (window - 1) // 2
    return ((j >= i - left) & (j <= i + window - 1 - left))[None, None]


@pytest.mark.parametrize("family", FAMILIES)
def test_discovery_finds_every_layer(family):
    layers = attention_modules(model(family))
    assert [layer.index for layer in layers] == [0, 1]
    assert all(layer.causal == (family in DECODERS) for layer in layers)
    assert all(layer.heads == 4 and layer.kv_heads == (2 if family in DECODERS else 4) for layer in layers)
    assert all(layer.head_dim == (8 if family == "vit" else 16) for layer in layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_patch_equals_the_model_and_unpatch_restores_it(family, rng):
    m = model(family)
    x = inputs(family, rng, batch=2)
    before = output(m, **x)
    with attnzoo.patch(m, "dense"):
        assert m.config._attn_implementation == "attnzoo"
        assert rel_err(output(m, **x), before) <= 1e-6, rng.initial_seed()
    assert m.config._attn_implementation == "sdpa"
    assert not any(hasattr(module, "_attnzoo_plan") for module in m.modules())
    assert torch.equal(output(m, **x), before)


@pytest.mark.parametrize("family", DECODERS + ENCODERS)
def test_sliding_window_runs_inside_the_model(family, rng):
    """Same output as the unpatched model given the method's window as an explicit 4-D mask, GQA included."""
    m = model(family)
    x = inputs(family, rng)
    causal = family in DECODERS
    with attnzoo.patch(m, "sliding_window", window=5):
        got = output(m, **x)
    assert rel_err(got, output(m, **x, attention_mask=band(N, 5, causal))) <= 1e-5, rng.initial_seed()
    assert rel_err(got, output(m, **x)) > 1e-3


@pytest.mark.parametrize("family", DECODERS + ENCODERS)
@torch.no_grad()
def test_padded_batch_equals_each_sequence_alone(family, rng):
    """Decoders pad on the left, encoders on the right; each sequence runs the method on its own span."""
    m = model(family)
    x = inputs(family, rng, batch=2)["input_ids"]
    mask = torch.ones(2, N, dtype=torch.long)
    short = N - 7
    if family in DECODERS:
        mask[1, :N - short] = 0
        kw = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    else:
        mask[1, short:] = 0
        kw = {}
    with attnzoo.patch(m, "sliding_window", window=6):
        batched = output(m, input_ids=x, attention_mask=mask, **kw)
        for b in range(2):
            keep = mask[b].bool()
            alone = output(m, input_ids=x[b:b + 1, keep])
            assert rel_err(batched[b, keep], alone[0]) <= 1e-5, (family, b, rng.initial_seed())


# ---- sliding-window layers ------------------------------------------------------------------------
WINDOWED = {
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**GQA, sliding_window=8)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**GQA, use_sliding_window=True, sliding_window=8, max_window_layers=0)),
    "gemma3": lambda: _gemma3(window=8),
}


@pytest.mark.parametrize("family", list(WINDOWED))
@torch.no_grad()
def test_windowed_layers_run_the_method_only_where_the_window_restricts_nothing(family, rng):
    torch.manual_seed(0)
    m = WINDOWED[family]().eval()
    windowed = [layer.index for layer in attention_modules(m) if layer.window is not None]
    assert windowed == ([0] if family == "gemma3" else [0, 1])
    long, short = inputs(family, rng)["input_ids"], inputs(family, rng)["input_ids"][:, :8]
    handle = attnzoo.patch(m, "streaming", window=3, sinks=1, layers=windowed)
    with handle:
        assert all(row["model_window"] == 8 for i in windowed for row in handle.describe()[i])
        longer = output(m, input_ids=long)
    # beyond the window the model's own windowed attention runs, bit for bit
    assert torch.equal(longer, output(m, input_ids=long))
    # a sequence no longer than the window runs the method, in every layer
    with attnzoo.patch(m, "streaming", window=3, sinks=1):
        within = output(m, input_ids=short)
    i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
    streaming = ((j <= i) & ((j < 1) | (i - j < 3)))[None, None]
    assert rel_err(within, output(m, input_ids=short, attention_mask=streaming)) <= 1e-5, rng.initial_seed()
    assert rel_err(within, output(m, input_ids=short)) > 1e-3


def test_window_rule():
    plan = LayerPlan([HeadGroup(None, attnzoo.get_method("streaming", window=4))], decode=True, window=8)
    assert plan.runs(8, 8, 8) and plan.runs(5, 5, 8)
    assert not plan.runs(9, 9, 8)       # a prefill longer than the window
    assert not plan.runs(1, 8, 8)       # a step over a cache that may have been cut to the window
    assert plan.runs(1, 40, None) and plan.runs(40, 40, None)
    assert not LayerPlan(plan.groups, decode=False).runs(1, 40)


@torch.no_grad()
def test_windowed_generation_matches_the_model(rng):
    """Generating past a window of 8: every call the window restricts runs the model's own attention."""
    torch.manual_seed(0)
    m = WINDOWED["mistral"]().eval()
    x = inputs("mistral", rng)["input_ids"][:, :6]
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(x)}
    plain = m.generate(x, **options)
    with attnzoo.patch(m, "sliding_window", window=8, decode="method"):
        assert torch.equal(m.generate(x, **options), plain)


# ---- vision ---------------------------------------------------------------------------------------
@torch.no_grad()
def test_vit_spatial_method_gets_the_patch_grid_and_the_cls_token(rng):
    vit = model("vit")
    x = inputs("vit", rng)
    handle = attnzoo.patch(vit, "neighborhood", kernel_size=3)
    with handle:
        method = handle.plans[0].groups[0].method
        assert method.config.grid == (4, 4) and method.config.num_global == 1
        got = output(vit, **x)
        with attnzoo.integrations.transformers.capture(vit, [0], probs=True) as cap:
            output(vit, **x)
    assert rel_err(got, output(vit, **x)) > 1e-3
    # the probabilities the patched layer used vanish outside 3 x 3 neighbourhoods (CLS sees and is seen by all)
    record = cap.first(0)
    support = method.support(record.q, record.k, record.v)
    assert bool((record.probs[~support.expand_as(record.probs)] == 0).all())
    assert torch.allclose(record.probs.sum(-1), torch.ones(1, 4, 17))


def test_vit_spatial_errors():
    vit = model("vit")
    with pytest.raises(InvalidArgumentError, match=r"grid: expected a product equal to N - num_global = 17 - 1 = 16, got \(3, 3\)"):
        attnzoo.patch(vit, attnzoo.get_method("neighborhood", grid=(3, 3), num_global=1, kernel_size=3))
    with pytest.raises(UnsupportedError, match="'biformer' takes no global tokens"):
        attnzoo.patch(vit, "biformer")
    assert vit.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_vit_model_without_a_head(rng):
    torch.manual_seed(0)
    vit = T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=24, patch_size=8)).eval()
    x = {"pixel_values": torch.randn(2, 3, 24, 24, generator=rng)}
    before = vit(**x).last_hidden_state
    handle = attnzoo.patch(vit, "halo", block_size=1, halo=1)
    with handle:
        assert handle.plans[0].groups[0].method.config.grid == (3, 3)
        assert rel_err(vit(**x).last_hidden_state, before) > 1e-3
    assert torch.equal(vit(**x).last_hidden_state, before)


# ---- refusals -------------------------------------------------------------------------------------
def test_implementation_the_model_cannot_switch_is_refused():
    import inspect

    decides = getattr(T.PreTrainedModel, "_can_set_attn_implementation", None)
    if decides is None or "_can_set_attn_implementation_cached_value" not in inspect.getsource(decides):
        pytest.skip(f"transformers {T.__version__} caches no _can_set_attn_implementation_cached_value to freeze a class with")

    class Frozen(T.LlamaForCausalLM):
        _can_set_attn_implementation_cached_value = False  # what transformers concludes for inline attention

    torch.manual_seed(0)
    m = Frozen(T.LlamaConfig(**GQA)).eval()
    with pytest.raises(UnsupportedError, match="did not switch LlamaAttention"):
        attnzoo.patch(m, "dense")
    assert m.config._attn_implementation == "sdpa"


def test_previous_implementation_is_restored():
    torch.manual_seed(0)
    m = T.LlamaForCausalLM(T.LlamaConfig(**GQA)).eval()
    m.set_attn_implementation("eager")
    with attnzoo.patch(m, "dense"):
        assert m.config._attn_implementation == "attnzoo"
    assert m.config._attn_implementation == "eager"


def test_arguments_attnzoo_cannot_honour_are_refused(rng):
    """A softcap (or any other keyword that changes attention) reaching a patched layer is an error, not ignored."""
    m = model("llama")
    layer = m.model.layers[0].self_attn
    q = torch.randn(1, 4, 6, 16, generator=rng)
    k = v = torch.randn(1, 2, 6, 16, generator=rng)
    from transformers import AttentionInterface

    attention = AttentionInterface()["attnzoo"]
    with attnzoo.patch(m, "sliding_window", window=3):
        with pytest.raises(UnsupportedError, match="softcap=50.0"):
            attention(layer, q, k, v, None, scaling=0.25, softcap=50.0)
        out, _ = attention(layer, q, k, v, None, scaling=0.25, softcap=None, position_ids=torch.arange(6)[None])
    assert out.shape == (1, 6, 4, 16)


# ---- finite check -----------------------------------------------------------------------------------
@torch.no_grad()
def test_inputs_are_checked_for_nan_once_per_patch(rng):
    """The first call of each layer checks q, k, v (a host sync); later calls skip the check."""
    m = model("llama")
    method = attnzoo.get_method("sliding_window", window=4)
    seen, forward = [], method.forward

    def spy(*args, **kw):
        seen.append(kw["check_finite"])
        return forward(*args, **kw)

    method.forward = spy
    x = inputs("llama", rng)
    with attnzoo.patch(m, method):
        output(m, **x)
        output(m, **x)
    with attnzoo.patch(m, method):
        output(m, **x)
    assert seen == [True, True, False, False, True, True]


@torch.no_grad()
def test_nan_inputs_are_refused_on_the_first_call(rng):
    m = model("llama")
    hook = m.model.embed_tokens.register_forward_hook(lambda module, args, out: torch.full_like(out, float("nan")))
    try:
        with attnzoo.patch(m, "sliding_window", window=4), pytest.raises(InvalidArgumentError, match="expected finite values"):
            output(m, **inputs("llama", rng))
    finally:
        hook.remove()
