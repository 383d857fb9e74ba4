"""The vision attention modules of issue 19 (group B): CrossScaleAttention (TOPIQ),
SelectiveDenseAttention (SDANet), ClassSemanticsAttention (CSA), SentenceAttentionBlock and
TagQueryDecoder (RAM++): shapes, dtypes, gradients, torch.compile, state dicts, bad input, and one
known answer per module with a deliberately wrong variant that the known answer catches."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from torch import nn
from torch.nn import functional as F

from attnzoo import modules
from attnzoo.errors import InvalidArgumentError
from attnzoo.modules.class_semantics_attention import ClassSemanticsAttention
from attnzoo.modules.cross_scale_attention import CrossScaleAttention, _CrossScaleLayer
from attnzoo.modules.selective_dense_attention import SelectiveDenseAttention
from attnzoo.modules.sentence_attention_block import SentenceAttentionBlock
from attnzoo.modules.tag_query_decoder import TagQueryDecoder


def _perturb(module: nn.Module, gen: torch.Generator, std: float = 0.2) -> nn.Module:
    """Add N(0, std^2) noise from ``gen`` to every parameter (zero-initialised layers included), in place."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen).to(p.dtype))
    return module


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


# name -> (module from a tiny config, inputs from gen, output shape)
CASES = {
    "CrossScaleAttention": (lambda: CrossScaleAttention(16, 2, mlp_dim=32, num_layers=2),
                            lambda g: (_randn(g, 2, 16, 3, 3), _randn(g, 2, 16, 5, 4)), (2, 16, 3, 3)),
    "SelectiveDenseAttention": (lambda: SelectiveDenseAttention(8, 3, 1, hidden_dim=4, kernel_size=3, context_ratio=0.25),
                                lambda g: ([_randn(g, 2, 8, 8, 8), _randn(g, 2, 8, 4, 4), _randn(g, 2, 8, 2, 2)],),
                                (2, 8, 4, 4)),
    "ClassSemanticsAttention": (lambda: ClassSemanticsAttention(6, 8, hidden_dim=4),
                                lambda g: (_randn(g, 2, 6, 10), _randn(g, 2, 8, 10)), (2, 8, 10)),
    "SentenceAttentionBlock": (lambda: SentenceAttentionBlock(8, 5, expansion=2, squeeze_image=True),
                               lambda g: (_randn(g, 2, 8, 3, 3), _randn(g, 2, 5)), (2, 8, 3, 3)),
    "TagQueryDecoder": (lambda: TagQueryDecoder(5, num_descriptions=3, concept_dim=8, hidden_dim=16, num_heads=2, mlp_dim=32),
                        lambda g: (_randn(g, 2, 7, 8),), (2, 5)),
}
NAMES = sorted(CASES)


def _build(name: str, gen: torch.Generator):
    make, inputs, shape = CASES[name]
    return _perturb(make(), gen), inputs(gen), shape


def _cast(inputs, dtype):
    return tuple([t.to(dtype) for t in x] if isinstance(x, list) else x.to(dtype) for x in inputs)


def test_every_module_is_registered_with_its_paper():
    infos = {i.name: i for i in modules.list_modules()}
    for name in NAMES:
        assert infos[name].arxiv and infos[name].title and infos[name].family == ("module",), infos.get(name)
        assert type(modules.create(name, **{"TagQueryDecoder": {"num_tags": 3}, "ClassSemanticsAttention":
                                           {"semantic_channels": 4, "channels": 8}, "SentenceAttentionBlock":
                                           {"channels": 8, "sentence_dim": 4}}.get(name, {}))).__name__ == name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_and_dtype(name, dtype, rng):
    module, inputs, shape = _build(name, rng)
    out = module.to(dtype)(*_cast(inputs, dtype))
    assert out.shape == shape and out.dtype == dtype, (tuple(out.shape), out.dtype)
    assert torch.isfinite(out).all(), rng.initial_seed()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name, rng):
    module, inputs, _ = _build(name, rng)
    module(*inputs).sin().sum().backward()
    for pname, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, (pname, rng.initial_seed())


@pytest.mark.parametrize("name", NAMES)
def test_compiles_with_fullgraph_and_matches_eager(name, rng):
    module, inputs, _ = _build(name, rng)
    module.eval()  # batch norm reads its running statistics: both runs see the same state
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert rel_err(compiled(*inputs), module(*inputs)) <= 1e-6, rng.initial_seed()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name, rng):
    module, inputs, _ = _build(name, rng)
    if name == "SelectiveDenseAttention":
        module(*inputs)  # a training step moves the batch-norm running statistics away from their defaults
    fresh = CASES[name][0]()
    fresh.load_state_dict(module.state_dict())
    module.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(*inputs), module(*inputs))


def _bad_inputs(name: str, g: torch.Generator):
    """(inputs, the argument the error must name) for the tiny config of ``name``."""
    if name == "CrossScaleAttention":
        high, low = _randn(g, 2, 16, 3, 3), _randn(g, 2, 16, 5, 4)
        return [((high[:, :8], low), "high"), ((high, low[:1]), "low"), ((high.flatten(2), low), "high"),
                ((high, low.double()), "low"), ((high, "low"), "low")]
    if name == "SelectiveDenseAttention":
        levels = [_randn(g, 2, 8, 8, 8), _randn(g, 2, 8, 4, 4), _randn(g, 2, 8, 2, 2)]
        return [((levels[:2],), "features"), (([levels[0], levels[1][:, :4], levels[2]],), "features[1]"),
                (([levels[0], levels[1], levels[2][:1]],), "features[2]"), (([levels[0][0]] + levels[1:],), "features[0]"),
                (([levels[0], levels[1][:, :, :0], levels[2]],), "features[1]")]
    if name == "ClassSemanticsAttention":
        semantics, features = _randn(g, 2, 6, 10), _randn(g, 2, 8, 10)
        return [((semantics[:, :3], features), "semantics"), ((semantics, features[:, :, :9]), "features"),
                ((semantics, features[:, :4]), "features"), ((semantics[0], features), "semantics"),
                ((semantics.long(), features), "semantics")]
    if name == "SentenceAttentionBlock":
        image, sentence = _randn(g, 2, 8, 3, 3), _randn(g, 2, 5)
        return [((image[:, :4], sentence), "image"), ((image, sentence[:, :4]), "sentence"),
                ((image, sentence[:1]), "sentence"), ((image[0], sentence), "image")]
    image = _randn(g, 2, 7, 8)
    return [((image[..., :4],), "image"), ((image[:, :0],), "image"), ((image[0],), "image"),
            ((image, _randn(g, 4, 2, 6)), "descriptions")]


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_names_the_argument(name, rng):
    module, _, _ = _build(name, rng)
    for inputs, argument in _bad_inputs(name, rng):
        with pytest.raises(InvalidArgumentError) as info:
            module(*inputs)
        assert info.value.argument == argument, (info.value, argument)


def test_bad_configuration_names_the_argument():
    for make, argument in [(lambda: CrossScaleAttention(15, 2), "dim"), (lambda: CrossScaleAttention(16, 2, num_layers=0), "num_layers"),
                           (lambda: SelectiveDenseAttention(8, 3, 3), "refine_level"),
                           (lambda: SelectiveDenseAttention(8, 3, 0, kernel_size=4), "kernel_size"),
                           (lambda: SelectiveDenseAttention(8, 3, 0, context_ratio=0.0), "context_ratio"),
                           (lambda: ClassSemanticsAttention(4, 8, kernel_size=2), "kernel_size"),
                           (lambda: SentenceAttentionBlock(8, 4, gate="tanh"), "gate"),
                           (lambda: TagQueryDecoder(0), "num_tags"), (lambda: TagQueryDecoder(3, hidden_dim=30, num_heads=4), "hidden_dim")]:
        with pytest.raises(InvalidArgumentError) as info:
            make()
        assert info.value.argument == argument, (info.value, argument)


# ---- known answers, each with a wrong variant it must catch -----------------------------------------

def _cross_scale_error(module: CrossScaleAttention, gen: torch.Generator) -> float:
    """A low-level map whose tokens are all equal gives every query the same attention read-out,
    out_proj(v_proj(LN(token))), whatever the queries: compare with that closed form."""
    high = _randn(gen, 2, 16, 3, 3)
    low = _randn(gen, 2, 16, 1, 1).expand(2, 16, 4, 5).contiguous()
    x = high.flatten(2).transpose(1, 2)
    token = low[:, :, 0, 0][:, None]  # (B, 1, dim)
    for layer in module.layers:
        attn = layer.attention
        normed = F.layer_norm(token, (16,), layer.norm_context.weight, layer.norm_context.bias)
        x = x + F.linear(F.linear(normed, attn.v_proj.weight, attn.v_proj.bias), attn.out_proj.weight, attn.out_proj.bias)
        x = x + layer.mlp(F.layer_norm(x, (16,), layer.norm_mlp.weight, layer.norm_mlp.bias))
    with torch.no_grad():
        return rel_err(module(high, low), x.transpose(1, 2).reshape(high.shape))


def test_cross_scale_attention_reads_the_low_level_map_known_answer(rng, monkeypatch):
    module = _perturb(CrossScaleAttention(16, 2, mlp_dim=32, num_layers=2), rng)
    assert _cross_scale_error(module, rng) <= 1e-5, rng.initial_seed()

    def self_attention(layer, x, context):  # mutant: the high-level tokens attend to themselves
        x = x + layer.attention(layer.norm_query(x), layer.norm_context(x))
        return x + layer.mlp(layer.norm_mlp(x))

    monkeypatch.setattr(_CrossScaleLayer, "forward", self_attention)
    assert _cross_scale_error(module, rng) > 1e-2, rng.initial_seed()


def _identical_levels_error(module: SelectiveDenseAttention, gen: torch.Generator) -> float:
    """All levels equal to x: both attentions are convex combinations over the levels, so each
    returns x; the global-context refinement starts at zero: the output is exactly x + x + x."""
    x = _randn(gen, 2, 8, 4, 4)
    with torch.no_grad():
        return rel_err(module([x, x, x]), 3 * x)


class _ChannelSoftmaxSDA(SelectiveDenseAttention):
    """Mutant: the channel weights are normalised over the channels instead of the levels."""

    def forward(self, features):
        levels = self.gather(features)
        B, L, C = levels.shape[:3]
        union = levels.sum(dim=1)
        squeezed = self.channel_squeeze(union.mean(dim=(2, 3), keepdim=True))
        channel_weights = self.channel_logits(squeezed).view(B, L, C, 1, 1).softmax(dim=2)
        pooled = torch.cat((union.mean(dim=1, keepdim=True), union.amax(dim=1, keepdim=True)), dim=1)
        spatial_weights = self.spatial_logits(pooled).softmax(dim=1).unsqueeze(2)
        fused = (levels * channel_weights).sum(dim=1) + (levels * spatial_weights).sum(dim=1)
        return features[self.refine_level] + fused + self.context_transform(self.global_context(fused))


def test_selective_dense_attention_of_identical_levels_is_three_times_the_input(rng):
    config = {"channels": 8, "num_levels": 3, "refine_level": 1, "hidden_dim": 4, "kernel_size": 3, "context_ratio": 0.25}
    for cls, holds in ((SelectiveDenseAttention, True), (_ChannelSoftmaxSDA, False)):
        torch.manual_seed(rng.initial_seed())
        module = cls(**config)
        with torch.no_grad():  # random weights everywhere but the zero-initialised last conv of the refinement
            for p in list(module.channel_logits.parameters()) + list(module.spatial_logits.parameters()):
                p.add_(torch.randn(p.shape, generator=rng))
        assert (_identical_levels_error(module, rng) <= 1e-5) == holds, (cls.__name__, rng.initial_seed())


def test_selective_dense_global_context_is_a_softmax_pooling(rng):
    module = _perturb(SelectiveDenseAttention(8, 3, 0, hidden_dim=4), rng)
    x = _randn(rng, 2, 8, 3, 5)
    weights = module.context_logits(x).flatten(2).softmax(-1)  # (B, 1, HW)
    expected = (x.flatten(2) * weights).sum(-1)[..., None, None]
    assert rel_err(module.global_context(x), expected) <= 1e-5, rng.initial_seed()


def _zero_gates_error(module: ClassSemanticsAttention, gen: torch.Generator) -> float:
    """With zero gate logits both weights are sigmoid(0) = 1/2: F * 1/2 + F * 1/2 = F exactly."""
    with torch.no_grad():
        for p in list(module.channel_logits.parameters()) + list(module.temporal_logits.parameters()):
            p.zero_()
        features = _randn(gen, 2, 8, 10)
        return rel_err(module(_randn(gen, 2, 6, 10), features), features)


def _weights_ignore_features_error(module: ClassSemanticsAttention, gen: torch.Generator) -> float:
    """The weights come from the class semantics only: for one R, out / F is the same for two F."""
    semantics, f1, f2 = _randn(gen, 2, 6, 10), _randn(gen, 2, 8, 10), _randn(gen, 2, 8, 10)
    with torch.no_grad():
        return rel_err(module(semantics, f2) / f2, module(semantics, f1) / f1)


class _SelfGatedCSA(ClassSemanticsAttention):
    """Mutant: SE-style self-attention, the temporal weights read the encoded features F."""

    def forward(self, semantics, features):
        channel, _ = self.attention_weights(semantics)
        return features * channel + features * torch.sigmoid(features.mean(dim=1, keepdim=True))


class _MeanFusedCSA(ClassSemanticsAttention):
    """Mutant: the two attended features are averaged instead of summed."""

    def forward(self, semantics, features):
        return super().forward(semantics, features) / 2


def test_class_semantics_attention_known_answers(rng):
    for cls, zero_gate_holds, semantics_only_holds in ((ClassSemanticsAttention, True, True), (_SelfGatedCSA, False, False),
                                                       (_MeanFusedCSA, False, True)):
        module = _perturb(cls(6, 8, hidden_dim=4), rng)
        assert (_weights_ignore_features_error(module, rng) <= 1e-5) == semantics_only_holds, (cls.__name__, rng.initial_seed())
        assert (_zero_gates_error(module, rng) <= 1e-6) == zero_gate_holds, (cls.__name__, rng.initial_seed())


def _uniform_gate_error(module: SentenceAttentionBlock, gen: torch.Generator) -> float:
    """Zero excitation logits: the softmax over the C channels is 1/C each (sigmoid: 1/2 each)."""
    with torch.no_grad():
        for p in module.excite[-1].parameters():
            p.zero_()
        image = _randn(gen, 2, 6, 3, 3)
        expected = image / 6 if module.gate == "softmax" else image / 2
        return rel_err(module(image, _randn(gen, 2, 4)), expected)


class _BatchSoftmaxBlock(SentenceAttentionBlock):
    """Mutant: the softmax runs over the batch instead of the channels."""

    def channel_weights(self, image, sentence):
        return self.excite(sentence).softmax(dim=0)


def test_sentence_attention_block_known_answers(rng):
    for gate in ("softmax", "sigmoid"):
        assert _uniform_gate_error(_perturb(SentenceAttentionBlock(6, 4, gate=gate), rng), rng) <= 1e-6, rng.initial_seed()
    assert _uniform_gate_error(_perturb(_BatchSoftmaxBlock(6, 4), rng), rng) > 0.5, rng.initial_seed()
    # without squeeze_image the weights depend on the sentence alone: two images, one sentence, one set of weights
    module = _perturb(SentenceAttentionBlock(6, 4), rng)
    sentence = _randn(rng, 2, 4)
    w1, w2 = module.channel_weights(_randn(rng, 2, 6, 3, 3), sentence), module.channel_weights(_randn(rng, 2, 6, 3, 3), sentence)
    assert torch.equal(w1, w2) and rel_err(w1.sum(-1), torch.ones(2)) <= 1e-6
    assert rel_err(module.channel_weights(_randn(rng, 2, 6, 3, 3), _randn(rng, 2, 4)), w1) > 1e-3, rng.initial_seed()


class _TagSoftmaxDecoder(TagQueryDecoder):
    """Mutant: the description weights are normalised over the tags instead of each tag's descriptions."""

    def concept_embeddings(self, image_global, descriptions=None):
        descriptions = self._descriptions(descriptions)
        cosine = torch.einsum("bc,tdc->btd", F.normalize(image_global, dim=-1), descriptions)
        return torch.einsum("btd,tdc->btc", (self.logit_scale.exp() * cosine).softmax(dim=1), descriptions)


def _planted_description_error(module: TagQueryDecoder, gen: torch.Generator) -> float:
    """Each tag has one description along the image's global token (the others orthogonal to it)
    and a sharp scale: every tag's concept embedding is that planted description."""
    image_global = F.normalize(_randn(gen, 1, 8), dim=-1)
    others = _randn(gen, 4, 3, 8)
    others = F.normalize(others - (others @ image_global.T) * image_global, dim=-1)
    planted = torch.arange(4) % 3
    descriptions = others.clone()
    descriptions[torch.arange(4), planted] = image_global[0]
    with torch.no_grad():
        module.logit_scale.fill_(torch.log(torch.tensor(200.0)))
        got = module.concept_embeddings(3 * image_global, descriptions)
    return rel_err(got[0], image_global.expand(4, 8))


def test_tag_query_decoder_picks_the_planted_description(rng):
    config = {"num_descriptions": 3, "concept_dim": 8, "hidden_dim": 16, "num_heads": 2, "mlp_dim": 32}
    assert _planted_description_error(_perturb(TagQueryDecoder(4, **config), rng), rng) <= 1e-6, rng.initial_seed()
    assert _planted_description_error(_perturb(_TagSoftmaxDecoder(4, **config), rng), rng) > 0.1, rng.initial_seed()


def test_tag_queries_do_not_see_each_other(rng, monkeypatch):
    """No self-attention among tags (RAM++ removes it): permuting the tags permutes the logits, and a
    tag's logit does not change when other tags are added."""
    module = _perturb(TagQueryDecoder(5, num_descriptions=2, concept_dim=8, hidden_dim=16, num_heads=2, mlp_dim=32), rng)
    image, order = _randn(rng, 2, 7, 8), torch.randperm(5, generator=rng)
    with torch.no_grad():
        logits = module(image)
        assert rel_err(module(image, module.descriptions[order]), logits[:, order]) <= 1e-6, rng.initial_seed()
        assert rel_err(module(image, module.descriptions[:2]), logits[:, :2]) <= 1e-6, rng.initial_seed()


def test_tag_query_decoder_runs_another_attention_method(rng):
    """method= swaps the attention inside; the dense method's output is the reference."""
    config = {"num_descriptions": 2, "concept_dim": 8, "hidden_dim": 16, "num_heads": 2, "mlp_dim": 32}
    dense = _perturb(TagQueryDecoder(5, **config), rng)
    other = TagQueryDecoder(5, method="sliding_window", window=1000, **config)
    other.load_state_dict(dense.state_dict())
    image = _randn(rng, 2, 7, 8)
    with torch.no_grad():
        assert rel_err(other(image), dense(image)) <= 1e-5, rng.initial_seed()
