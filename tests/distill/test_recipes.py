"""The vision recipes (clear, linfusion) on a tiny attnzoo.nn ViT: losses fall, checkpoints reload, layers swap back."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.distill import distill
from attnzoo.errors import UnsupportedError
from attnzoo.integrations import attnzoo_nn
from attnzoo.trained.vit_digits import ViTConfig, ViTDigits

pytest.importorskip("safetensors")


def tiny_vit():
    torch.manual_seed(0)
    model = ViTDigits(ViTConfig(image_size=16, dim=32, depth=2, num_heads=2, mlp_dim=32)).eval()
    with torch.no_grad():  # sharper attention than random init gives, so a local window loses something
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(6.0)
    return model


@pytest.mark.parametrize("recipe, config, term", [("clear", dict(radius=2.0), "attention_mse"), ("linfusion", {}, "output_mse")])
def test_vision_recipe_loss_falls_and_reloads(tmp_path, rng, recipe, config, term):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(3, 1, 16, 16, generator=rng)
    run = distill(model, recipe, images[:1], tmp_path, val=images[1:], steps=20, progress=False, **config)
    part = [r[term] for r in run.metrics]
    assert part[-1] < 0.8 * part[0] and run.metrics[-1]["block_mse"] < run.metrics[0]["block_mse"], part
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the teacher is untouched
    dense = model(images)
    with attnzoo_nn.install(model, dict(run.methods)):
        expected = model(images)
    with attnzoo.patch(model, recipe, weights=tmp_path) as patched:
        assert torch.equal(patched(images), expected)
    assert torch.equal(model(images), dense)  # unpatched: the model's own layers are back
    assert all(type(b.attn.method).__name__ == "Dense" for b in model.blocks)


def test_clear_refuses_transformers_models(tmp_path, rng):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=31, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    llama = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(UnsupportedError, match="attnzoo.nn"):
        distill(llama, "clear", torch.randint(0, 31, (1, 16), generator=rng), tmp_path / "x", steps=1, progress=False)
