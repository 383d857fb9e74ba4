"""CSA: attention weights for an action detector's encoded features, learned from class-semantic features."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError, check_int
from ..registry import ComponentInfo
from . import AttentionModule, register
from ._checks import check_tensor


@register
class ClassSemanticsAttention(AttentionModule):
    """Class semantics-based attention: semantics (B, C_R, T), features (B, C, T) -> (B, C, T).

    Sridhar et al., "Class Semantics-based Attention for Action Detection" (CSA, arXiv 2109.02613).
    The attention weights come from R, the class-semantics-rich features of the action-recognition
    encoder (e.g. its per-snippet features or class scores), not from the encoded features F they
    are applied to: a temporal conv of ``kernel_size`` over R (ReLU, ``hidden_dim`` channels) reads
    the local temporal distribution of class semantics; its temporal mean and a linear layer give
    a sigmoid weight per channel of F, a temporal conv gives a sigmoid weight per time step; the
    channel- and temporal-attended features are summed: ``F * a_c + F * a_t``.

    The layer sizes (one shared conv, the sum as the fusion) are this implementation's reading of
    the paper's figure; absent: the feature encoders and the localization sub-network (BMN, G-TAD)
    around CSA, and its training losses.
    """

    info = ComponentInfo(
        name="ClassSemanticsAttention", title="Class Semantics-based Attention for Action Detection", arxiv="2109.02613",
        family=("module",),
        summary="CSA: channel and temporal attention on encoded video features, learned from class-semantic features")

    def __init__(self, semantic_channels: int, channels: int, *, hidden_dim: int | None = None, kernel_size: int = 3):
        super().__init__()
        self.semantic_channels = check_int("semantic_channels", semantic_channels)
        self.channels = check_int("channels", channels)
        hidden_dim = max(1, self.channels // 4) if hidden_dim is None else check_int("hidden_dim", hidden_dim)
        kernel_size = check_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise InvalidArgumentError("kernel_size", "an odd integer (one weight per time step)", kernel_size)
        self.encode = nn.Sequential(nn.Conv1d(self.semantic_channels, hidden_dim, kernel_size, padding=kernel_size // 2),
                                    nn.ReLU())
        self.channel_logits = nn.Linear(hidden_dim, self.channels)
        self.temporal_logits = nn.Conv1d(hidden_dim, 1, kernel_size, padding=kernel_size // 2)

    def attention_weights(self, semantics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """semantics (B, C_R, T) -> (channel weights (B, C, 1), temporal weights (B, 1, T)), each in (0, 1)."""
        check_tensor("semantics", semantics, (None, self.semantic_channels, None), f"(batch, {self.semantic_channels}, time)",
                     self.channel_logits.weight.dtype)
        hidden = self.encode(semantics)
        channel = torch.sigmoid(self.channel_logits(hidden.mean(dim=-1))).unsqueeze(-1)
        return channel, torch.sigmoid(self.temporal_logits(hidden))

    def forward(self, semantics: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """semantics R (B, C_R, T), encoded features F (B, C, T) -> F * a_c + F * a_t (B, C, T)."""
        channel, temporal = self.attention_weights(semantics)
        check_tensor("features", features, (semantics.shape[0], self.channels, semantics.shape[-1]),
                     f"({semantics.shape[0]}, {self.channels}, {semantics.shape[-1]}) (batch and time of semantics)",
                     self.channel_logits.weight.dtype)
        return features * channel + features * temporal

    def extra_repr(self) -> str:
        return f"semantic_channels={self.semantic_channels}, channels={self.channels}"
