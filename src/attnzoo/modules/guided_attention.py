"""Multi-scale self-guided attention: position and channel attention refined in two guided steps."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InvalidArgumentError, check_int
from ..registry import ComponentInfo, get_method
from . import AttentionModule, register
from ._checks import check_image


def _conv_bn(c_in: int, c_out: int, act: type[nn.Module] = nn.PReLU) -> list[nn.Module]:
    """A 3x3 convolution, BatchNorm and ``act``; no bias (BatchNorm cancels it)."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), act()]


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> one head of H*W tokens (B, 1, H*W, C)."""
    return x.flatten(2).transpose(1, 2).unsqueeze(1)


class PositionAttention(nn.Module):
    """Position attention (PAM, DANet's form): x (B, C, H, W) -> gamma * attend(x) + x, every
    position attending to every position with logits q_i . k_j (unscaled), q and k 1x1 projections
    to C / reduction channels (k without bias); gamma starts at 0, so the module starts as the identity."""

    def __init__(self, channels: int, reduction: int, method: nn.Module):
        super().__init__()
        inner = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1, bias=False)  # a key bias adds q_i . b to a whole row: softmax ignores it
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.method = method
        method.materialize(1, 1, inner, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.method(_tokens(self.query(x)), _tokens(self.key(x)), _tokens(self.value(x)), scale=1.0)
        return self.gamma * out.squeeze(1).transpose(1, 2).reshape(x.shape) + x


class ChannelAttention(nn.Module):
    """Channel attention (CAM): x (B, C, H, W) -> gamma * attend(x) + x, every channel map (an
    H*W vector) attending to every channel with logits F_i . F_j (the paper's equation; DANet's
    code softmaxes max - F_i . F_j instead); gamma starts at 0."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = x.flatten(2).unsqueeze(1)  # (B, 1, C, HW)
        return self.gamma * self.method(maps, maps, maps, scale=1.0).reshape(x.shape) + x


class EncoderDecoder(nn.Module):
    """The guiding encoder-decoder of one step: x (B, 2C, H, W) -> (encoding (B, 8C, H/4, W/4),
    reconstruction (B, 2C, H, W)), two conv-conv-maxpool blocks down and two conv-conv-deconv up."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        self.encoder = nn.Sequential(*_conv_bn(c, 2 * c, nn.ReLU), *_conv_bn(2 * c, 2 * c, nn.ReLU), nn.MaxPool2d(2),
                                     *_conv_bn(2 * c, 4 * c, nn.ReLU), *_conv_bn(4 * c, 4 * c, nn.ReLU), nn.MaxPool2d(2))
        self.decoder = nn.Sequential(*_conv_bn(4 * c, 2 * c, nn.ReLU), *_conv_bn(2 * c, 2 * c, nn.ReLU),
                                     nn.ConvTranspose2d(2 * c, 2 * c, 2, stride=2),
                                     *_conv_bn(2 * c, c, nn.ReLU), *_conv_bn(c, c, nn.ReLU), nn.ConvTranspose2d(c, c, 2, stride=2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoding = self.encoder(x)
        return encoding, self.decoder(encoding)


class GuidedStep(nn.Module):
    """One guided attention step: x (B, 2C, H, W) -> (attention features (B, C, H, W), encoding,
    reconstruction): (PAM branch + CAM branch) * conv(reconstruction), then a 1x1 convolution."""

    def __init__(self, channels: int, reduction: int, method: str, method_options: dict[str, Any]):
        super().__init__()
        c = channels
        position = PositionAttention(c, reduction, get_method(method, **method_options))
        channel = ChannelAttention(get_method(method, **method_options))
        self.position = nn.Sequential(*_conv_bn(2 * c, c), position, *_conv_bn(c, c))
        self.channel = nn.Sequential(*_conv_bn(2 * c, c), channel, *_conv_bn(c, c))
        self.guide = EncoderDecoder(2 * c)
        self.guide_proj = nn.Conv2d(2 * c, c, 3, padding=1)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        encoding, reconstruction = self.guide(x)
        attended = (self.position(x) + self.channel(x)) * self.guide_proj(reconstruction)
        return self.out(attended), encoding, reconstruction


@register
class GuidedAttention(AttentionModule):
    """Self-guided attention of one scale: features F_s and the fused multi-scale map F_MS, both
    (B, C, H, W) with H and W multiples of 4 -> refined features (B, C, H, W).

    Sinha and Dolz, "Multi-scale self-guided attention for medical image segmentation" (arXiv
    1906.02849). Step 1 takes [F_s, F_MS] (2C channels) through a position attention branch and
    a channel attention branch (conv, attention, conv) whose sum is multiplied by a projection of
    an encoder-decoder's reconstruction of the input: A_1. Step 2 does the same, with its own
    weights, on [F_s, A_1 * F_MS]. ``forward(..., return_losses=True)`` also returns the paper's
    guiding losses: ``guidance`` (mean squared distance between the two steps' encodings) and
    ``reconstruction`` (each step's input against its reconstruction). Both attentions run
    through attnzoo's executors: ``method`` (default ``"dense"``) with ``method_options`` swaps
    them (position attention has H*W tokens of C/reduction dims; channel attention C tokens of
    H*W dims). Convolutions followed by BatchNorm and the key projection carry no bias (the
    authors' code has them; they cannot change the output). Absent: the ResNeXt backbone, the multi-scale fusion producing F_MS and the
    segmentation heads and their losses.
    """

    info = ComponentInfo(
        name="GuidedAttention",
        title="Multi-scale self-guided attention for medical image segmentation",
        arxiv="1906.02849",
        family=("module",),
        summary="position + channel attention guided by an encoder-decoder, refined over two steps",
    )

    def __init__(self, channels: int, *, reduction: int = 8, method: str = "dense", method_options: dict[str, Any] | None = None):
        super().__init__()
        self.channels = check_int("channels", channels)
        reduction = check_int("reduction", reduction)
        if method_options is not None and not isinstance(method_options, dict):
            raise InvalidArgumentError("method_options", "None or a dict of the method's options", repr(method_options))
        options = dict(method_options or {})
        self.steps = nn.ModuleList(GuidedStep(channels, reduction, method, options) for _ in range(2))

    def forward(self, features: torch.Tensor, fused: torch.Tensor, *, return_losses: bool = False):
        check_image("features", features, self.channels, multiple_of=4)
        check_image("fused", fused, self.channels, multiple_of=4)
        if fused.shape != features.shape:
            raise InvalidArgumentError("fused", f"the shape of features {tuple(features.shape)}", tuple(fused.shape))
        first_input = torch.cat([features, fused], dim=1)
        first, first_encoding, first_reconstruction = self.steps[0](first_input)
        second_input = torch.cat([features, first * fused], dim=1)
        refined, second_encoding, second_reconstruction = self.steps[1](second_input)
        if not return_losses:
            return refined
        losses = {
            "guidance": F.mse_loss(first_encoding, second_encoding),
            "reconstruction": F.mse_loss(first_reconstruction, first_input) + F.mse_loss(second_reconstruction, second_input),
        }
        return refined, losses
