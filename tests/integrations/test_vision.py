"""Spatial methods inside transformers vision towers (ViT, DeiT, DINOv2, CLIP, SigLIP; tiny random-init
models from configs) with the patch grid and leading tokens found from the model, and timm's
VisionTransformer through ``attn_layer=`` (where timm imports)."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from integrations.spatial_reference import MaskedSDPA, neighborhood_mask

import attnzoo
from attnzoo import UnsupportedError

transformers = pytest.importorskip("transformers")
from attnzoo.integrations.transformers import TokenLayout, token_layout  # noqa: E402

IMAGE, PATCH = 40, 8  # a 5 x 5 patch grid
# family: (config class, model class, extra config, leading tokens the model puts before its patch tokens)
FAMILIES = {
    "vit": ("ViTConfig", "ViTModel", {}, 1),
    "deit": ("DeiTConfig", "DeiTModel", {}, 2),  # CLS + distillation token
    "dinov2": ("Dinov2Config", "Dinov2Model", {}, 1),
    "dinov2_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", {"num_register_tokens": 3}, 4),
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", {}, 1),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel", {}, 0),  # no CLS token; an attention-pooling head
}


def tiny(family: str):
    config_name, model_name, extra, _ = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                                image_size=IMAGE, patch_size=PATCH, **extra)
    return getattr(transformers, model_name)(config).eval()


@torch.no_grad()
def hidden(model, pixels):
    return model(pixel_values=pixels).last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_token_layout_found_from_the_model(family, rng):
    model = tiny(family)
    layout = token_layout(model)
    assert layout == TokenLayout((IMAGE // PATCH, IMAGE // PATCH), FAMILIES[family][3])
    assert hidden(model, torch.randn(1, 3, IMAGE, IMAGE, generator=rng)).shape[1] == layout.tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_neighborhood_needs_no_grid(family, rng):
    """patch(model, "neighborhood", kernel_size=3) equals the model's own attention under the
    3 x 3 neighbourhood mask on the patch grid with the leading tokens global; dense equals native."""
    model, pixels = tiny(family), torch.randn(2, 3, IMAGE, IMAGE, generator=rng)
    leading, grid = FAMILIES[family][3], (IMAGE // PATCH, IMAGE // PATCH)
    native = hidden(model, pixels)
    with MaskedSDPA(lambda n: neighborhood_mask(n, grid, leading)):
        expected = hidden(model, pixels)
    with attnzoo.patch(model, "dense"):
        torch.testing.assert_close(hidden(model, pixels), native, rtol=1e-5, atol=1e-5)
    with attnzoo.patch(model, "neighborhood", kernel_size=3):
        out = hidden(model, pixels)
    assert rel_err(out, expected) < 1e-5 and rel_err(out, native) > 1e-3


def test_text_models_get_no_layout():
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)
    assert token_layout(transformers.BertModel(config)) is None


def test_methods_without_global_tokens_refused_where_the_model_has_them():
    with pytest.raises(UnsupportedError, match="biformer.*takes no global tokens"):
        attnzoo.patch(tiny("vit"), "biformer", n_win=5, topk=2)
    with attnzoo.patch(tiny("siglip"), "biformer", n_win=5, topk=2):  # SigLIP has none
        pass


# ---- timm ----------------------------------------------------------------------------------------
def timm_reference(x, state, heads, mask=None):
    """timm's Attention written out: fused qkv, (B, N, 3, H, D), softmax(q k^T / sqrt(D)) v, proj."""
    B, N, C = x.shape
    qkv = (x @ state["qkv.weight"].T + state["qkv.bias"]).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    logits = q @ k.transpose(-1, -2) * (C // heads) ** -0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    return out @ state["proj.weight"].T + state["proj.bias"]


TIMM_KWARGS = dict(qkv_bias=True, qk_norm=False, scale_norm=False, proj_bias=True, attn_drop=0.0, proj_drop=0.0,
                   norm_layer=torch.nn.LayerNorm, device=None, dtype=None)  # what timm's Block passes its attn_layer


@pytest.mark.parametrize("method, config", [("dense", {}), ("neighborhood", dict(grid=(4, 4), num_global=1, kernel_size=3))])
def test_timm_attn_layer_loads_timm_weights(method, config, rng):
    from attnzoo.integrations.timm import attn_layer

    dim, heads = 32, 2
    layer = attn_layer(method, **config)(dim, num_heads=heads, **TIMM_KWARGS)
    state = {"qkv.weight": torch.randn(3 * dim, dim, generator=rng) / dim ** 0.5, "qkv.bias": torch.randn(3 * dim, generator=rng),
             "proj.weight": torch.randn(dim, dim, generator=rng) / dim ** 0.5, "proj.bias": torch.randn(dim, generator=rng)}
    layer.load_state_dict(dict(state))
    x = torch.randn(2, 17, dim, generator=rng)
    mask = neighborhood_mask(17, (4, 4), 1) if method != "dense" else None
    torch.testing.assert_close(layer(x), timm_reference(x, state, heads, mask), rtol=1e-4, atol=1e-5)


def test_timm_attn_layer_refuses_what_it_does_not_compute(rng):
    from attnzoo.integrations.timm import attn_layer

    with pytest.raises(UnsupportedError, match="qk_norm=True"):
        attn_layer()(32, num_heads=2, **{**TIMM_KWARGS, "qk_norm": True})
    layer = attn_layer()(32, num_heads=2, **TIMM_KWARGS)
    with pytest.raises(UnsupportedError, match="attn_mask"):
        layer(torch.randn(1, 4, 32), attn_mask=torch.ones(4, 4, dtype=torch.bool))


def _import_timm():
    try:
        import timm
    except ImportError as e:  # timm imports torchvision, whose CPU build the registries here do not offer
        pytest.skip(f"timm does not import ({e}); timm needs torchvision")
    return timm


def test_timm_vision_transformer_with_attnzoo_layers(rng):
    timm = _import_timm()
    from attnzoo.integrations.timm import attn_layer

    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    torch.manual_seed(0)
    native = timm.models.VisionTransformer(**kwargs).eval()
    ours = timm.models.VisionTransformer(**kwargs, attn_layer=attn_layer("dense")).eval()
    ours.load_state_dict(native.state_dict())
    pixels = torch.randn(2, 3, 32, 32, generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), native(pixels), rtol=1e-4, atol=1e-5)
        local = timm.models.VisionTransformer(**kwargs, attn_layer=attn_layer("neighborhood", grid=(4, 4), num_global=1,
                                                                                kernel_size=3)).eval()
        local.load_state_dict(native.state_dict())
        assert rel_err(local(pixels), native(pixels)) > 1e-4
