"""The CNN attention blocks of group A: ULSAM, ELA, GuidedAttention, GnConv, FocalModulation.

Every block: registered with its paper, shapes, float32 / bfloat16, gradients to every parameter,
torch.compile against eager, state-dict round trip, errors naming the argument; then per block a
reference written independently of the module (plain loops and functional calls) and a known
answer from the paper's structure, each with a deliberately wrong variant that the check catches.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from attnzoo import modules
from attnzoo.cli import main as cli_main
from attnzoo.errors import InvalidArgumentError
from attnzoo.modules.ela import ELA
from attnzoo.modules.focal_modulation import FocalModulation
from attnzoo.modules.gnconv import GnConv
from attnzoo.modules.guided_attention import ChannelAttention, GuidedAttention, PositionAttention
from attnzoo.modules.ulsam import ULSAM

# name -> (tiny config, input shapes); GuidedAttention takes (features, fused), FocalModulation channels-last.
CASES = {
    "ULSAM": (dict(channels=8, num_subspaces=4), [(2, 8, 5, 6)]),
    "ELA": (dict(channels=16, variant="S"), [(2, 16, 5, 6)]),
    "GnConv": (dict(channels=8, order=3, kernel_size=3), [(2, 8, 5, 6)]),
    "FocalModulation": (dict(dim=8, focal_level=2), [(2, 5, 6, 8)]),
    "GuidedAttention": (dict(channels=4), [(2, 4, 8, 8), (2, 4, 8, 8)]),
}
NAMES = sorted(CASES)


def inputs(name, gen, dtype=torch.float32):
    return [torch.randn(*shape, generator=gen).to(dtype) for shape in CASES[name][1]]


def built(name, gen):
    """The block with every parameter and BatchNorm statistic drawn from ``gen`` (GuidedAttention's
    gammas start at 0, which would leave its attentions out of every check), in eval mode."""
    module = modules.create(name, **CASES[name][0])
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for mod in module.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
    return module.eval()


# ---- every block ---------------------------------------------------------------------------------
def test_all_are_registered_with_their_paper(capsys):
    assert set(NAMES) <= set(modules.MODULES.names())
    for name in NAMES:
        info = modules.MODULES.get(name).info
        assert info.name == name and info.arxiv and info.title and info.family == ("module",)
    assert cli_main(["list", "--kind", "modules"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NAMES) and "2207.14284" in out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_dtypes(name, dtype, rng):
    module = modules.create(name, **CASES[name][0]).to(dtype)
    xs = inputs(name, rng, dtype)
    out = module(*xs)
    assert out.shape == xs[0].shape and out.dtype == dtype and torch.isfinite(out).all()
    module.eval()
    assert module(*xs).shape == xs[0].shape


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name, rng):
    # eval mode: training-mode BatchNorm cancels a scale of its input (ULSAM's depth-wise weights)
    module = built(name, rng)
    xs = [x.requires_grad_() for x in inputs(name, rng)]
    out = module(*xs)
    (out * torch.randn(out.shape, generator=rng)).sum().backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"
    assert all(x.grad.abs().sum() > 0 for x in xs)


@pytest.mark.parametrize("name", NAMES)
def test_compile_matches_eager(name, rng):
    module = built(name, rng)
    xs = inputs(name, rng)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*xs), module(*xs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name, rng):
    module = built(name, rng)
    fresh = modules.create(name, **CASES[name][0]).eval()
    fresh.load_state_dict(module.state_dict())
    xs = inputs(name, rng)
    assert torch.equal(fresh(*xs), module(*xs))


BAD_INPUTS = [
    ("ULSAM", [(2, 6, 5, 6)], "x: expected 8 channels"),
    ("ULSAM", [(8, 5, 6)], "x: expected a 4-D tensor"),
    ("ULSAM", [(0, 8, 5, 6)], "x: expected a non-empty"),
    ("ELA", [(2, 15, 5, 6)], "x: expected 16 channels"),
    ("GnConv", [(2, 8, 5)], "x: expected a 4-D tensor"),
    ("FocalModulation", [(2, 8, 5, 6)], r"x: expected 8 channels \(\(B, H, W, C\)"),
    ("GuidedAttention", [(2, 4, 6, 8), (2, 4, 6, 8)], "features: expected H and W multiples of 4"),
    ("GuidedAttention", [(2, 4, 8, 8), (2, 4, 8, 4)], r"fused: expected the shape of features \(2, 4, 8, 8\)"),
    ("GuidedAttention", [(2, 4, 8, 8), (2, 3, 8, 8)], "fused: expected 4 channels"),
]


@pytest.mark.parametrize("name, shapes, message", BAD_INPUTS)
def test_bad_input_names_the_argument(name, shapes, message, rng):
    module = modules.create(name, **CASES[name][0])
    with pytest.raises(InvalidArgumentError, match=message):
        module(*[torch.randn(*s, generator=rng) for s in shapes])
    with pytest.raises(InvalidArgumentError, match="expected a floating-point tensor"):
        module(*[torch.ones(CASES[name][1][0], dtype=torch.long) for _ in shapes])


@pytest.mark.parametrize("name, config, message", [
    ("ULSAM", dict(channels=8, num_subspaces=3), "num_subspaces: expected a divisor of channels=8"),
    ("ULSAM", dict(channels=8, pool_size=2), "pool_size: expected an odd integer"),
    ("ELA", dict(channels=16, variant="XL"), "variant: expected one of"),
    ("ELA", dict(channels=24), "norm_groups: expected a divisor of channels=24"),
    ("GnConv", dict(channels=12, order=4), r"channels: expected a multiple of 2\^\(order-1\) = 8"),
    ("GnConv", dict(channels=8, scale=0.0), "scale: expected a number in"),
    ("FocalModulation", dict(dim=8, focal_window=4), "focal_window, focal_factor: expected an odd window"),
    ("FocalModulation", dict(dim=0), "dim: expected an integer >= 1"),
    ("GuidedAttention", dict(channels=4, method_options=3), "method_options: expected None or a dict"),
])
def test_bad_config_names_the_argument(name, config, message):
    with pytest.raises(InvalidArgumentError, match=message):
        modules.create(name, **config)


# ---- ULSAM ---------------------------------------------------------------------------------------
def ulsam_reference(m: ULSAM, x):
    """Each subspace on its own: its slice of the depth-wise scale, max-pool, point-wise sum, an
    explicit softmax over the positions (normalization=False)."""
    B, C, H, W = x.shape
    n = C // m.num_subspaces
    out = []
    for s in range(m.num_subspaces):
        f = x[:, s * n : (s + 1) * n]
        dw = f * m.depthwise.weight[s * n : (s + 1) * n].view(1, n, 1, 1) + m.depthwise.bias[s * n : (s + 1) * n].view(1, n, 1, 1)
        pooled = F.max_pool2d(dw, 3, stride=1, padding=1)
        logit = (pooled * m.pointwise.weight[s].view(1, n, 1, 1)).sum(1, keepdim=True) + m.pointwise.bias[s]
        e = torch.exp(logit - logit.amax(dim=(2, 3), keepdim=True))
        out.append(f * e / e.sum(dim=(2, 3), keepdim=True) + f)
    return torch.cat(out, 1)


def test_ulsam_matches_a_per_subspace_reference(rng):
    m = ULSAM(8, 2, normalization=False)
    x = torch.randn(2, 8, 5, 7, generator=rng) * 3
    torch.testing.assert_close(m(x), ulsam_reference(m, x))


def check_planted_spot_in_one_subspace(m: ULSAM, rng):
    """A large value planted at one position of one subspace draws that subspace's attention
    there and leaves the other subspaces' maps uniform (each subspace has its own map)."""
    torch.nn.init.ones_(m.depthwise.weight), torch.nn.init.zeros_(m.depthwise.bias)
    torch.nn.init.ones_(m.pointwise.weight), torch.nn.init.zeros_(m.pointwise.bias)
    x = torch.zeros(1, 8, 6, 6)
    i, j = (int(v) for v in torch.randint(0, 6, (2,), generator=rng))
    x[0, 2, i, j] = 20.0  # subspace 1 of 4
    maps = m.attention_maps(x)[0]
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    near = ((rows - i).abs() <= 1) & ((cols - j).abs() <= 1)  # the 3x3 max-pool spreads the spot there
    assert maps[1][near].sum() > 0.999
    torch.testing.assert_close(maps[1][near], torch.full((int(near.sum()),), 1 / int(near.sum())), atol=1e-6, rtol=0)
    for s in (0, 2, 3):
        torch.testing.assert_close(maps[s], torch.full((6, 6), 1 / 36))


def test_ulsam_attends_to_a_planted_spot_per_subspace(rng, monkeypatch):
    check_planted_spot_in_one_subspace(ULSAM(8, 4, normalization=False), rng)
    per_subspace = ULSAM._maps

    def one_shared_map(self, x):  # mutant: one map from every subspace's logits, shared by all
        logits = per_subspace(self, x).log().sum(1, keepdim=True)
        return logits.flatten(2).softmax(-1).view_as(logits).expand(-1, self.num_subspaces, -1, -1)

    monkeypatch.setattr(ULSAM, "_maps", one_shared_map)
    with pytest.raises(AssertionError):
        check_planted_spot_in_one_subspace(ULSAM(8, 4, normalization=False), rng)


@pytest.mark.parametrize("normalization", [False, True])
def test_ulsam_with_a_zero_pointwise_branch_is_uniform(normalization, rng, monkeypatch):
    """Zero point-wise weights: every map is 1/(H*W) and the output is x * (1 + 1/(H*W))."""
    def check(m):
        torch.nn.init.zeros_(m.pointwise.weight)
        if m.pointwise.bias is not None:
            torch.nn.init.zeros_(m.pointwise.bias)
        x = torch.randn(2, 8, 4, 5, generator=rng)
        torch.testing.assert_close(m(x), x * (1 + 1 / 20))

    check(ULSAM(8, 4, normalization=normalization))
    monkeypatch.setattr(ULSAM, "_maps", lambda self, x: _across_subspaces(self, x))  # mutant: softmax over subspaces
    with pytest.raises(AssertionError):
        check(ULSAM(8, 4, normalization=normalization))


def _across_subspaces(m: ULSAM, x):
    logits = m.pointwise_norm(m.pointwise(m.pool(m.depthwise_norm(m.depthwise(x)))))
    return logits.softmax(1)
