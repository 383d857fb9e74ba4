"""attnzoo.patch on tiny random-init diffusers models built from configs (FLUX, SD3, DiT, UNet; offline, fast)."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from integrations.spatial_reference import MaskedSDPA, neighborhood_mask

import attnzoo
from attnzoo import InvalidArgumentError, UnsupportedError

diffusers = pytest.importorskip("diffusers")
from attnzoo.integrations.diffusers import RoutedProcessor, current_patch  # noqa: E402

B, TEXT = 2, 5
FLUX_GRID = (6, 8)


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "flux":
        model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                                 axes_dims_rope=(4, 6, 6))
    elif kind == "sd3":
        model = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                                pooled_projection_dim=16, out_channels=4)
    elif kind == "dit":
        model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8,
                                                patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4)
    else:
        model = diffusers.UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=16, sample_size=8,
                                               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                                               norm_num_groups=4, in_channels=4, out_channels=4)
    return model.eval()


def flux_ids(grid):
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.stack([torch.zeros(rows.numel()), rows.flatten(), cols.flatten()], 1).float()


def inputs(kind: str, gen: torch.Generator, dtype=torch.float32):
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    if kind == "flux":  # packed latents: one token per (row, col) of img_ids
        return dict(hidden_states=r(B, FLUX_GRID[0] * FLUX_GRID[1], 4), encoder_hidden_states=r(B, TEXT, 32), pooled_projections=r(B, 32),
                    timestep=torch.rand(B, generator=gen).to(dtype), img_ids=flux_ids(FLUX_GRID), txt_ids=torch.zeros(TEXT, 3))
    if kind == "sd3":
        return dict(hidden_states=r(B, 4, 8, 12), encoder_hidden_states=r(B, TEXT, 32), pooled_projections=r(B, 16),
                    timestep=torch.tensor([10.0, 500.0], dtype=dtype))
    if kind == "dit":
        return dict(hidden_states=r(B, 4, 8, 8), timestep=torch.tensor([10, 500]), class_labels=torch.tensor([1, 3]))
    return dict(sample=r(B, 4, 8, 12), timestep=torch.tensor([10, 500]), encoder_hidden_states=r(B, TEXT, 16))


KINDS = ("flux", "sd3", "dit", "unet")
# the image-token grids each model's attention layers see for the inputs above, and the text tokens among them
GRIDS = {"flux": ({FLUX_GRID}, TEXT), "sd3": ({(4, 6)}, TEXT), "dit": ({(4, 4)}, 0), "unet": ({(8, 12), (4, 6)}, 0)}


@torch.no_grad()
def run(model, x):
    return model(**x).sample


@pytest.mark.parametrize("kind", KINDS)
def test_dense_equals_native_and_unpatch_restores(kind, rng):
    model, x = tiny(kind), inputs(kind, rng)
    native = run(model, x)
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")}
    with attnzoo.patch(model, "dense") as patched:
        assert patched is model
        routed = [m for m in model.modules() if isinstance(getattr(m, "processor", None), RoutedProcessor)]
        assert routed, "no processor was replaced"
        torch.testing.assert_close(run(model, x), native, rtol=1e-5, atol=1e-6)
    assert current_patch(model) is None
    assert {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")} == before
    assert not any(hasattr(m, "attnzoo_method") or "set_processor" in vars(m) for m in model.modules())
    assert torch.equal(run(model, x), native)


def layer_mask(kind: str):
    """The reference mask of a layer with n tokens: the one expected grid with n - text tokens."""
    grids, text = GRIDS[kind]
    return lambda n: neighborhood_mask(n, next(g for g in grids if g[0] * g[1] == n - text), text, text_last=kind == "sd3")


@pytest.mark.parametrize("kind", KINDS)
def test_spatial_method_sees_the_latent_grid_and_text_tokens(kind, rng):
    """neighborhood (3 x 3) patched in equals the native processors under a mask written from the
    expected layout: the grid from the latent (packed FLUX ids, SD3 / DiT patches, UNet levels),
    the text tokens global wherever the processor puts them."""
    model, x = tiny(kind), inputs(kind, rng)
    grids, text = GRIDS[kind]
    with MaskedSDPA(layer_mask(kind)):
        expected = run(model, x)
    with attnzoo.patch(model, "neighborhood", kernel_size=3):
        out = run(model, x)
        seen = {(layout.grid, layout.num_global) for layout in current_patch(model)._methods}
    assert seen == {(g, text) for g in grids}
    assert rel_err(out, expected) < 1e-5
    assert rel_err(out, run(model, x)) > 1e-3  # the method changes the output


def test_grid_given_is_checked_against_the_latent(rng):
    model, x = tiny("dit"), inputs("dit", rng)
    with attnzoo.patch(model, "neighborhood", kernel_size=3, grid=(4, 4)):
        run(model, x)  # matches the 8 x 8 latent in 2 x 2 patches
    with attnzoo.patch(model, "neighborhood", kernel_size=3, grid=(3, 5)):
        with pytest.raises(InvalidArgumentError, match=r"grid: expected a grid of the layer's 16 image tokens.*the latent gives \(4, 4\)"):
            run(model, x)


def test_clear_on_flux_non_square_packed_latents(rng):
    model = tiny("flux")
    x = {**inputs("flux", rng), "hidden_states": torch.randn(B, 4 * 10, 4, generator=rng), "img_ids": flux_ids((4, 10))}
    with attnzoo.patch(model, "clear", radius=2):
        out = run(model, x)
        assert {layout.grid for layout in current_patch(model)._methods} == {(4, 10)}
    assert out.shape == (B, 40, 4) and torch.isfinite(out).all()


def test_scrambled_flux_ids_refused(rng):
    model, x = tiny("flux"), inputs("flux", rng)
    x["img_ids"] = x["img_ids"].flip(0)
    with attnzoo.patch(model, "neighborhood", kernel_size=3), pytest.raises(UnsupportedError, match="row-major grid"):
        run(model, x)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_joint_attention_refuses_methods_without_global_tokens(kind):
    with pytest.raises(UnsupportedError, match="biformer.*joint text \\+ image tokens"):
        attnzoo.patch(tiny(kind), "biformer", n_win=2, topk=2)


def test_biformer_runs_where_there_is_no_text(rng):
    model, x = tiny("dit"), inputs("dit", rng)
    with attnzoo.patch(model, "biformer", n_win=2, topk=2):
        assert torch.isfinite(run(model, x)).all()


def test_causal_only_method_refused():
    with pytest.raises(UnsupportedError, match="causal only"):
        attnzoo.patch(tiny("dit"), "streaming", window=4)


def test_unsupported_processor_type_refused():
    model = tiny("dit")
    for m in model.modules():
        if hasattr(m, "set_processor"):
            m.set_processor(diffusers.models.attention_processor.AttnProcessor())
    with pytest.raises(UnsupportedError, match="processor type.*AttnProcessor .*not supported"):
        attnzoo.patch(model, "dense")


def test_processor_changes_refused_while_patched(rng):
    """enable_attention_slicing (set_attention_slice) and set_attn_processor would silently drop the
    patch: they are refused until unpatch, and work after."""
    model, x = tiny("unet"), inputs("unet", rng)
    attnzoo.patch(model, "linfusion")
    with pytest.raises(UnsupportedError, match="unpatch"):
        model.set_attention_slice("auto")
    with pytest.raises(UnsupportedError, match="unpatch"):
        model.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    assert attnzoo.unpatch(model) and not attnzoo.unpatch(model)
    model.set_attention_slice("auto")
    run(model, x)


def test_learned_method_is_a_submodule_and_moves_with_the_model(rng):
    """linfusion (one per self-attention module, UNet attn1 only) lands in state_dict and follows .to()."""
    model, x = tiny("unet"), inputs("unet", rng)
    native = run(model.double(), {k: v.double() if v.is_floating_point() else v for k, v in x.items()})
    model.float()
    attnzoo.patch(model, "linfusion")
    keys = [k for k in model.state_dict() if ".attnzoo_method." in k]
    assert keys and all(".attn1." in k for k in keys)
    model.double()
    out = run(model, {k: v.double() if v.is_floating_point() else v for k, v in x.items()})
    assert out.dtype == torch.float64 and rel_err(out, native) > 1e-4
    attnzoo.unpatch(model)
    assert not [k for k in model.state_dict() if "attnzoo_method" in k]


def test_pipeline_patch_survives_to(rng):
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    pipe = diffusers.DiTPipeline(transformer=tiny("dit"), vae=vae, scheduler=diffusers.DDIMScheduler())
    x = inputs("dit", rng)
    native = run(pipe.transformer.double(), {**x, "hidden_states": x["hidden_states"].double()})
    handle = attnzoo.patch(pipe, "dense")
    assert handle.denoiser is pipe.transformer and current_patch(pipe) is handle
    pipe.to(torch.float32)
    pipe.to(torch.float64)
    torch.testing.assert_close(run(pipe.transformer, {**x, "hidden_states": x["hidden_states"].double()}), native)
    assert attnzoo.unpatch(pipe) and current_patch(pipe.transformer) is None
