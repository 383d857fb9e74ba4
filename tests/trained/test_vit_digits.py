"""vit-digits: the fixed digits split, the model built from attnzoo.nn.Attention, the shipped weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnzoo
from attnzoo.errors import InvalidArgumentError
from attnzoo.trained import TRAINED, vit_digits
from attnzoo.trained.vit_digits import ViTConfig, ViTDigits

pytest.importorskip("sklearn")
from attnzoo.trained import digits  # noqa: E402


def test_split_is_disjoint_complete_and_stratified():
    parts = {name: digits.split_indices(name) for name in digits.SPLITS}
    joined = np.concatenate(list(parts.values()))
    assert len(joined) == len(set(joined.tolist())) == 1797
    _, labels = digits._raw()
    for name, (low, high) in digits.SPLITS.items():
        counts = np.bincount(labels[parts[name]], minlength=10)
        expected = np.bincount(labels, minlength=10) * (high - low)
        assert np.all(np.abs(counts - expected) <= 1), (name, counts, expected)
    assert np.array_equal(parts["test"], digits.split_indices("test"))  # fixed, not drawn per call


def test_prepare_scales_raw_digits_to_unit_images():
    raw, _ = digits._raw()
    images = digits.prepare(raw[:3])
    assert images.shape == (3, 1, 32, 32) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    # bilinear upscaling by 4 keeps the mean grey level of each 8 x 8 image (up to the edge handling)
    assert torch.allclose(images.mean((1, 2, 3)), torch.as_tensor(raw[:3] / 16).mean((1, 2)).float(), atol=0.02)
    with pytest.raises(InvalidArgumentError, match="images"):
        digits.prepare(raw[:3, :4])
    with pytest.raises(InvalidArgumentError, match="split"):
        digits.split_indices("holdout")


def test_model_tokens_and_bad_input():
    model = ViTDigits(ViTConfig(image_size=8, dim=16, depth=1, num_heads=2, mlp_dim=16))
    assert model.grid == (4, 4)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(InvalidArgumentError, match="images"):
        model(torch.rand(2, 1, 16, 16))
    with pytest.raises(InvalidArgumentError, match="image_size"):
        ViTDigits(ViTConfig(image_size=9))


def test_shipped_weights_load_and_reach_their_recorded_accuracy():
    model, prepare = attnzoo.models.load("vit-digits")
    assert "vit-digits" in TRAINED and prepare is digits.prepare
    assert all(isinstance(a, attnzoo.nn.Attention) for a in (b.attn for b in model.blocks))
    record = vit_digits.metadata()["record"]
    images, labels = digits.load_split("test")
    acc = vit_digits.accuracy(model, images, labels)
    assert acc == pytest.approx(record["test_accuracy"], abs=1e-9)
    assert acc >= 0.9, acc


def test_patched_vit_digits_runs_a_spatial_method_and_unpatches():
    model, _ = attnzoo.models.load("vit-digits")
    images, _ = digits.load_split("val")
    images = images[:8]
    dense = model(images)
    with attnzoo.patch(model, "neighborhood", grid=model.grid, kernel_size=15):  # 15 x 15 window on 16 x 16: nearly dense
        local = model(images)
    assert not torch.equal(local, dense)
    assert torch.equal(model(images), dense)
    assert (local.argmax(-1) == dense.argmax(-1)).float().mean() >= 0.75
