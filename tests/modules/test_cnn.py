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

from attnzoo import get_method, modules
from attnzoo.cli import main as cli_main
from attnzoo.errors import InvalidArgumentError
from attnzoo.modules.ela import ELA
from attnzoo.modules.focal_modulation import FocalModulation
from attnzoo.modules.gnconv import GnConv
from attnzoo.modules.guided_attention import (
    ChannelAttention,
    GuidedAttention,
    PositionAttention,
)
from attnzoo.modules.ulsam import ULSAM

# name -> (tiny config, input shapes); GuidedAttention takes (features, fused), FocalModulation channels-last.
CASES = {
    "ULSAM": ({"channels": 8, "num_subspaces": 4}, [(2, 8, 5, 6)]),
    "ELA": ({"channels": 16, "variant": "S"}, [(2, 16, 5, 6)]),
    "GnConv": ({"channels": 8, "order": 3, "kernel_size": 3}, [(2, 8, 5, 6)]),
    "FocalModulation": ({"dim": 8, "focal_level": 2}, [(2, 5, 6, 8)]),
    "GuidedAttention": ({"channels": 4}, [(2, 4, 8, 8), (2, 4, 8, 8)]),
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
    ("ULSAM", {"channels": 8, "num_subspaces": 3}, "num_subspaces: expected a divisor of channels=8"),
    ("ULSAM", {"channels": 8, "pool_size": 2}, "pool_size: expected an odd integer"),
    ("ELA", {"channels": 16, "variant": "XL"}, "variant: expected one of"),
    ("ELA", {"channels": 24}, "norm_groups: expected a divisor of channels=24"),
    ("GnConv", {"channels": 12, "order": 4}, r"channels: expected a multiple of 2\^\(order-1\) = 8"),
    ("GnConv", {"channels": 8, "scale": 0.0}, "scale: expected a number in"),
    ("FocalModulation", {"dim": 8, "focal_window": 4}, "focal_window, focal_factor: expected an odd window"),
    ("FocalModulation", {"dim": 0}, "dim: expected an integer >= 1"),
    ("GuidedAttention", {"channels": 4, "method_options": 3}, "method_options: expected None or a dict"),
])
def test_bad_config_names_the_argument(name, config, message):
    with pytest.raises(InvalidArgumentError, match=message):
        modules.create(name, **config)


# ---- ULSAM ---------------------------------------------------------------------------------------
def ulsam_reference(m: ULSAM, x):
    """Each subspace on its own: its slice of the depth-wise scale, max-pool, point-wise sum, an
    explicit softmax over the positions (normalization=False)."""
    n = x.shape[1] // m.num_subspaces
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


# ---- ELA -----------------------------------------------------------------------------------------
def ela_reference(m: ELA, x):
    """Strip means, the grouped 1-D convolution as explicit shifted sums, GroupNorm by hand."""
    conv, norm = m.conv, m.norm
    C, k = x.shape[1], conv.kernel_size[0]
    per_group = C // conv.groups

    def attend(strip):  # (B, C, L)
        padded = F.pad(strip, (k // 2, k // 2))
        L = strip.shape[-1]
        y = torch.zeros_like(strip)
        for c in range(C):
            g = c // per_group
            for ci in range(per_group):
                for t in range(k):
                    y[:, c] += conv.weight[c, ci, t] * padded[:, g * per_group + ci, t : t + L]
        groups = y.view(y.shape[0], norm.num_groups, -1)
        mean, var = groups.mean(-1, keepdim=True), groups.var(-1, unbiased=False, keepdim=True)
        y = ((groups - mean) / torch.sqrt(var + norm.eps)).view_as(y)
        return torch.sigmoid(y * norm.weight[:, None] + norm.bias[:, None])

    return x * attend(x.mean(3))[:, :, :, None] * attend(x.mean(2))[:, :, None, :]


@pytest.mark.parametrize("variant", ["T", "S"])
def test_ela_matches_a_loop_reference(variant, rng):
    m = ELA(16, variant)
    with torch.no_grad():
        m.norm.weight.copy_(torch.randn(16, generator=rng)), m.norm.bias.copy_(torch.randn(16, generator=rng))
    x = torch.randn(2, 16, 6, 9, generator=rng)
    torch.testing.assert_close(m(x), ela_reference(m, x))


def test_ela_variants_are_the_papers():
    expected = {"T": (5, 64, 32), "B": (7, 64, 16), "S": (5, 8, 16), "L": (7, 8, 16)}  # kernel, conv groups, GN groups at C=64
    for variant, (kernel, groups, norm_groups) in expected.items():
        m = ELA(64, variant)
        assert (m.conv.kernel_size[0], m.conv.groups, m.norm.num_groups) == (kernel, groups, norm_groups)


def check_ela_zero_convolution_halves_twice(m: ELA, rng):
    """A zero convolution: GroupNorm of zeros is its bias (0), the sigmoid 1/2 on each axis, so
    y = x * 1/2 * 1/2."""
    torch.nn.init.zeros_(m.conv.weight)
    x = torch.randn(2, 16, 5, 6, generator=rng)
    torch.testing.assert_close(m(x), x / 4)


def test_ela_known_answer_and_a_one_axis_mutant(rng, monkeypatch):
    check_ela_zero_convolution_halves_twice(ELA(16, "B"), rng)
    monkeypatch.setattr(ELA, "forward", lambda self, x: x * self.axis_attention(x.mean(dim=3)).unsqueeze(3))
    with pytest.raises(AssertionError):
        check_ela_zero_convolution_halves_twice(ELA(16, "B"), rng)


def test_ela_pools_strip_means(rng):
    """The gates depend on the row and column means only: a pattern with zero row and column means
    added to x leaves them unchanged, so y = (x + pattern) * the gates of x."""
    m = ELA(16, "T")
    x = torch.randn(1, 16, 4, 6, generator=rng)
    pattern = torch.randn(1, 16, 4, 6, generator=rng)
    pattern = pattern - pattern.mean(3, keepdim=True) - pattern.mean(2, keepdim=True) + pattern.mean((2, 3), keepdim=True)
    gates = torch.sigmoid(m.norm(m.conv(x.mean(3))))[:, :, :, None] * torch.sigmoid(m.norm(m.conv(x.mean(2))))[:, :, None, :]
    torch.testing.assert_close(m(x + pattern), (x + pattern) * gates)


# ---- GnConv --------------------------------------------------------------------------------------
def gnconv_reference(m: GnConv, x):
    """The recursion p_{k+1} = g_k(p_k) * s * DW_k(q_k) with one depth-wise convolution per order,
    its weights sliced out of the module's one convolution."""
    widths, w_in, b_in = m.widths, m.project_in.weight, m.project_in.bias
    p = F.conv2d(x, w_in[: widths[0]], b_in[: widths[0]])
    start = widths[0]
    gate_start = 0
    for k, width in enumerate(widths):
        q = F.conv2d(x, w_in[start : start + width], b_in[start : start + width])
        dw_w = m.depthwise.weight[gate_start : gate_start + width]
        dw_b = m.depthwise.bias[gate_start : gate_start + width]
        gate = m.scale * F.conv2d(q, dw_w, dw_b, padding=dw_w.shape[-1] // 2, groups=width)
        if k > 0:
            p = F.conv2d(p, m.widen[k - 1].weight, m.widen[k - 1].bias)
        p = p * gate
        start, gate_start = start + width, gate_start + width
    return F.conv2d(p, m.project_out.weight, m.project_out.bias)


@pytest.mark.parametrize("order", [1, 2, 4])
def test_gnconv_matches_the_recursion(order, rng):
    m = GnConv(16, order, kernel_size=5)
    x = torch.randn(2, 16, 6, 7, generator=rng)
    torch.testing.assert_close(m(x), gnconv_reference(m, x))


def check_gnconv_is_homogeneous_of_degree_order_plus_one(m: GnConv, rng):
    """With every bias zero, g^n Conv multiplies n + 1 linear functions of x: f(t x) = t^(n+1) f(x)."""
    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.zeros_(mod.bias)
    x = torch.randn(1, 16, 5, 5, generator=rng)
    t = 1.7
    torch.testing.assert_close(m(t * x), t ** (m.order + 1) * m(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("order", [2, 3])
def test_gnconv_interaction_order_and_a_mutant_missing_one_gate(order, rng, monkeypatch):
    check_gnconv_is_homogeneous_of_degree_order_plus_one(GnConv(16, order), rng)

    def last_gate_skipped(self, x):  # mutant: the last order's gate is not applied
        p, q = self.project_in(x).split([self.widths[0], sum(self.widths)], dim=1)
        gates = (self.depthwise(q) * self.scale).split(self.widths, dim=1)
        p = p * gates[0]
        for widen, gate in zip(self.widen, gates[1:-1]):
            p = widen(p) * gate
        return self.project_out(self.widen[-1](p))

    monkeypatch.setattr(GnConv, "forward", last_gate_skipped)
    with pytest.raises(AssertionError):
        check_gnconv_is_homogeneous_of_degree_order_plus_one(GnConv(16, order), rng)


# ---- FocalModulation -----------------------------------------------------------------------------
def focal_reference(m: FocalModulation, x):
    """The paper's equations in channels-first convolutions and explicit gates."""
    C, L = m.dim, m.focal_level
    w, b = m.inputs.weight, m.inputs.bias
    q = F.linear(x, w[:C], b[:C]).permute(0, 3, 1, 2)
    z = F.linear(x, w[C : 2 * C], b[C : 2 * C]).permute(0, 3, 1, 2)
    gates = F.linear(x, w[2 * C :], b[2 * C :]).permute(0, 3, 1, 2)
    total = 0
    for level in range(L):
        conv = m.levels[level][0]
        z = F.gelu(F.conv2d(z, conv.weight, padding=conv.weight.shape[-1] // 2, groups=C))
        total = total + gates[:, level : level + 1] * z
    total = total + gates[:, L : L + 1] * F.gelu(z.mean(dim=(2, 3), keepdim=True))
    modulator = F.conv2d(total, m.modulator.weight, m.modulator.bias)
    return F.linear((q * modulator).permute(0, 2, 3, 1), m.proj.weight, m.proj.bias)


@pytest.mark.parametrize("level", [1, 3])
def test_focal_modulation_matches_the_equations(level, rng):
    m = FocalModulation(8, focal_level=level)
    assert m.kernel_sizes == [3 + 2 * i for i in range(level)]
    x = torch.randn(2, 7, 6, 8, generator=rng)
    torch.testing.assert_close(m(x), focal_reference(m, x))


def only_gate(m: FocalModulation, level: int) -> None:
    """Fix the gates to 1 for ``level`` (0-based; focal_level is the global context) and 0 elsewhere."""
    C = m.dim
    with torch.no_grad():
        m.inputs.weight[2 * C :] = 0
        m.inputs.bias[2 * C :] = 0
        m.inputs.bias[2 * C + level] = 1


def check_focal_receptive_field(m: FocalModulation, rng):
    """Gates on the first level only: the output at a position sees x within that level's 3x3
    kernel and nothing beyond it; on the global level alone, everything."""
    x = torch.randn(1, 9, 9, 8, generator=rng)
    far = x.clone()
    far[0, 0, 0] += 5.0  # 4 rows and 4 columns away from the centre (4, 4)
    only_gate(m, 0)
    torch.testing.assert_close(m(far)[0, 4, 4], m(x)[0, 4, 4], rtol=0, atol=0)
    near = x.clone()
    near[0, 3, 5] += 5.0
    assert not torch.allclose(m(near)[0, 4, 4], m(x)[0, 4, 4])
    only_gate(m, m.focal_level)
    assert not torch.allclose(m(far)[0, 4, 4], m(x)[0, 4, 4])


def test_focal_modulation_receptive_field_and_an_ungated_mutant(rng, monkeypatch):
    check_focal_receptive_field(FocalModulation(8, focal_level=2), rng)

    def ungated(self, x):  # mutant: every context level summed, the gates ignored
        q, context, _ = self.inputs(x).permute(0, 3, 1, 2).split([self.dim, self.dim, self.focal_level + 1], dim=1)
        total = 0
        for layer in self.levels:
            context = layer(context)
            total = total + context
        total = total + self.act(context.mean(dim=(2, 3), keepdim=True))
        return self.proj((q * self.modulator(total)).permute(0, 2, 3, 1))

    monkeypatch.setattr(FocalModulation, "forward", ungated)
    with pytest.raises(AssertionError):
        check_focal_receptive_field(FocalModulation(8, focal_level=2), rng)


# ---- GuidedAttention -----------------------------------------------------------------------------
def test_position_and_channel_attention_match_explicit_softmax(rng):
    x = torch.randn(2, 16, 4, 5, generator=rng)
    pam = PositionAttention(16, 8, get_method("dense"))
    cam = ChannelAttention(get_method("dense"))
    with torch.no_grad():
        pam.gamma.fill_(0.7), cam.gamma.fill_(-0.4)
    flat = x.flatten(2)  # (B, C, N)
    q = torch.einsum("oc,bcn->bno", pam.query.weight[:, :, 0, 0], flat) + pam.query.bias
    k = torch.einsum("oc,bcn->bno", pam.key.weight[:, :, 0, 0], flat)
    v = torch.einsum("oc,bcn->bno", pam.value.weight[:, :, 0, 0], flat) + pam.value.bias
    positions = torch.softmax(q @ k.transpose(1, 2), -1) @ v  # (B, N, C), logits unscaled
    torch.testing.assert_close(pam(x), 0.7 * positions.transpose(1, 2).reshape(x.shape) + x)
    channels = torch.softmax(flat @ flat.transpose(1, 2), -1) @ flat  # (B, C, N)
    torch.testing.assert_close(cam(x), -0.4 * channels.reshape(x.shape) + x)


def check_same_steps_on_zero_fused_agree(m: GuidedAttention, rng):
    """With F_MS = 0 both steps take [F_s, 0] (step 2's is [F_s, A_1 * F_MS]); with step 2's
    weights set to step 1's, both encodings agree: the guidance loss is 0."""
    m.steps[1].load_state_dict(m.steps[0].state_dict())
    m.eval()
    features = torch.randn(2, 4, 8, 8, generator=rng)
    with torch.no_grad():
        assert m(features, torch.zeros_like(features), return_losses=True)[1]["guidance"].item() == 0.0
        assert m(features, torch.randn(2, 4, 8, 8, generator=rng), return_losses=True)[1]["guidance"].item() > 0.0


def test_guidance_known_answer_and_an_unguided_second_step(rng, monkeypatch):
    check_same_steps_on_zero_fused_agree(GuidedAttention(4), rng)

    def unguided(self, features, fused, *, return_losses=False):  # mutant: step 2 takes [F_s, A_1], not [F_s, A_1 * F_MS]
        first, first_encoding, _ = self.steps[0](torch.cat([features, fused], 1))
        _, second_encoding, _ = self.steps[1](torch.cat([features, first], 1))
        return first, {"guidance": F.mse_loss(first_encoding, second_encoding)}

    monkeypatch.setattr(GuidedAttention, "forward", unguided)
    with pytest.raises(AssertionError):
        check_same_steps_on_zero_fused_agree(GuidedAttention(4), rng)


def test_guided_attention_swaps_its_attention_method(rng):
    features, fused = torch.randn(2, 4, 8, 8, generator=rng), torch.randn(2, 4, 8, 8, generator=rng)
    dense = built("GuidedAttention", rng)
    linear = GuidedAttention(4, method="linear").eval()
    linear.load_state_dict(dense.state_dict())
    assert type(linear.steps[0].position[3].method).__name__ != type(dense.steps[0].position[3].method).__name__
    out = linear(features, fused)
    assert out.shape == features.shape and not torch.allclose(out, dense(features, fused))
