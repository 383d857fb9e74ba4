"""Sentence attention block: channel attention on image feature maps conditioned on a sentence embedding."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError, check_int
from ..registry import ComponentInfo
from . import AttentionModule, register
from ._checks import check_tensor


@register
class SentenceAttentionBlock(AttentionModule):
    """Sentence-conditioned channel attention: image (B, C, H, W), sentence (B, S) -> (B, C, H, W).

    Khoshsirat and Kambhamettu, "Sentence Attention Blocks for Answer Grounding" (arXiv
    2309.11593). A squeeze-and-excitation block whose excitation reads the sentence (question)
    embedding: ``w = gate(Linear(ReLU(LN(Linear(z)))))``, ``z`` the sentence embedding (with
    ``squeeze_image``, concatenated with the image's global average, SE's own squeeze), an
    expansion of ``expansion`` times its width instead of SE's reduction, and ``gate`` "softmax"
    over the channels (the authors' design) or "sigmoid" (SE's); the output is ``image * w`` per
    channel, so channels irrelevant to the sentence are filtered out.

    Absent: the backbone, the sentence encoder, the multi-scale merge blocks and the grounding head.
    """

    info = ComponentInfo(
        name="SentenceAttentionBlock", title="Sentence Attention Blocks for Answer Grounding", arxiv="2309.11593",
        family=("module",), summary="squeeze-and-excitation channel attention driven by a sentence embedding")

    def __init__(self, channels: int, sentence_dim: int, *, expansion: int = 4, gate: str = "softmax",
                 squeeze_image: bool = False):
        super().__init__()
        self.channels = check_int("channels", channels)
        self.sentence_dim = check_int("sentence_dim", sentence_dim)
        if gate not in ("softmax", "sigmoid"):
            raise InvalidArgumentError("gate", '"softmax" or "sigmoid"', repr(gate))
        if not isinstance(squeeze_image, bool):
            raise InvalidArgumentError("squeeze_image", "a bool", repr(squeeze_image))
        self.gate, self.squeeze_image = gate, squeeze_image
        in_dim = self.sentence_dim + (self.channels if squeeze_image else 0)
        hidden = in_dim * check_int("expansion", expansion)
        self.excite = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, self.channels))

    def channel_weights(self, image: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """image (B, C, H, W), sentence (B, S) -> the channel weights (B, C)."""
        dtype = self.excite[0].weight.dtype
        check_tensor("image", image, (None, self.channels, None, None), f"(batch, {self.channels}, height, width)", dtype)
        check_tensor("sentence", sentence, (image.shape[0], self.sentence_dim),
                     f"({image.shape[0]} (the batch of image), {self.sentence_dim})", dtype)
        z = torch.cat((sentence, image.mean(dim=(2, 3))), dim=-1) if self.squeeze_image else sentence
        logits = self.excite(z)
        return logits.softmax(dim=-1) if self.gate == "softmax" else torch.sigmoid(logits)

    def forward(self, image: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """image (B, C, H, W) re-weighted per channel by the sentence (B, S) -> (B, C, H, W)."""
        return image * self.channel_weights(image, sentence)[:, :, None, None]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, sentence_dim={self.sentence_dim}, gate={self.gate!r}, squeeze_image={self.squeeze_image}"
