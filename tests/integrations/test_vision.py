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
