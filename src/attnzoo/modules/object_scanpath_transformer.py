"""OAT: an object-level encoder-decoder that predicts a gaze scanpath as a sequence of fixated objects."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InvalidArgumentError, check_float, check_int
from ..nn import Attention
from ..registry import ComponentInfo
from . import AttentionModule, register


def sequence_encoding(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The sinusoidal encoding of positions 0..length-1: (length, dim), sin on even and cos on odd channels."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    angle = position * torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    return torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(1)[:, :dim].to(dtype)


class _Block(nn.Module):
    """Post-norm transformer layer: self-attention (causal for the decoder), optional cross-attention, ReLU MLP."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, *, causal: bool, cross: bool,
                 method: str):
        super().__init__()
        self.self_attn = Attention(dim, num_heads, method=method, causal=causal, qkv_bias=True)
        self.cross_attn = Attention(dim, num_heads, method=method, qkv_bias=True) if cross else None
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3 if cross else 2))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norms[0](x + self.dropout(self.self_attn(x)))
        if self.cross_attn is not None:
            x = self.norms[1](x + self.dropout(self.cross_attn(x, memory)))
        return self.norms[-1](x + self.dropout(self.mlp(x)))


@register
class ObjectScanpathTransformer(AttentionModule):
    """OAT (Fang et al., "OAT: Object-Level Attention Transformer for Gaze Scanpath Prediction",
    arXiv 2407.13335): object_features (B, N, feature_dim), object_positions (B, N, 2),
    target_feature (B, feature_dim), fixations (B, T) object indices -> logits (B, T + 1, N + 1).

    Every object is a token: its appearance (a linear map of its feature to dim/2) next to its
    object positional encoding (dim/2), random Fourier features of its centre, ``[cos(W x),
    sin(W x)] / sqrt(dim / 4)`` with W ~ N(0, 1 / position_scale^2) fixed at construction, so the
    inner product of two encodings is a function of the objects' displacement only, close to
    ``exp(-|x_a - x_b|^2 / (2 position_scale^2))``: nearby objects look alike to attention. The
    encoder reads the target token (its appearance and a learned slot) and the object tokens; the
    decoder reads a learned start token and the tokens of the objects fixated so far, plus the 1-D
    sinusoidal encoding of the fixation order, under causal self-attention and cross-attention to
    the encoder. The object attention module scores every step against every object with
    ``readout_heads`` bilinear maps mixed by a linear readout; the last column is the end of the
    scanpath. Row t predicts fixation t (row T: what follows the last given fixation). Attention runs
    through ``attnzoo.nn.Attention(method=...)``. Absent: the CNN that embeds object image crops
    (give features), the paper's fitted grid encoding (here random Fourier features of continuous
    positions), padding masks (all scenes of a batch have N objects) and the sampling of scanpaths.
    """

    info = ComponentInfo(
        name="ObjectScanpathTransformer",
        title="OAT: Object-Level Attention Transformer for Gaze Scanpath Prediction",
        arxiv="2407.13335",
        family=("module",),
        summary="object-level encoder-decoder over object tokens with a distance-based object positional encoding",
    )

    def __init__(self, feature_dim: int, *, dim: int = 512, num_heads: int = 4, num_encoder_layers: int = 4,
                 num_decoder_layers: int = 4, ffn_dim: int = 512, readout_heads: int = 2, position_scale: float = 0.1,
                 dropout: float = 0.1, method: str = "dense"):
        super().__init__()
        self.feature_dim = check_int("feature_dim", feature_dim)
        self.dim = check_int("dim", dim)
        if self.dim % 4:
            raise InvalidArgumentError("dim", "a multiple of 4 (appearance, cos and sin halves)", self.dim)
        dropout = check_float("dropout", dropout, low=0.0, high=1.0)
        scale = check_float("position_scale", position_scale, low=0.0, high=1e6, low_open=True)
        self.appearance = nn.Linear(self.feature_dim, self.dim // 2)
        self.register_buffer("frequencies", torch.randn(2, self.dim // 4) / scale)
        self.target_slot = nn.Parameter(torch.zeros(self.dim // 2))
        self.start = nn.Parameter(torch.randn(self.dim) * 0.02)
        ffn_dim = check_int("ffn_dim", ffn_dim)
        self.encoder = nn.ModuleList(_Block(self.dim, num_heads, ffn_dim, dropout, causal=False, cross=False, method=method)
                                     for _ in range(check_int("num_encoder_layers", num_encoder_layers)))
        self.decoder = nn.ModuleList(_Block(self.dim, num_heads, ffn_dim, dropout, causal=True, cross=True, method=method)
                                     for _ in range(check_int("num_decoder_layers", num_decoder_layers)))
        heads = check_int("readout_heads", readout_heads)
        self.score_decoder = nn.Linear(self.dim, heads * self.dim)
        self.score_encoder = nn.Linear(self.dim, heads * self.dim)
        self.readout = nn.Linear(heads, 1)
        self.dropout = nn.Dropout(dropout)

    def position_encoding(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (..., 2) -> (..., dim / 2): random Fourier features; their inner products depend on displacements only."""
        angle = positions.float() @ self.frequencies.float()
        return (torch.cat((angle.cos(), angle.sin()), dim=-1) / math.sqrt(self.dim // 4)).to(positions.dtype)

    def forward(self, object_features: torch.Tensor, object_positions: torch.Tensor, target_feature: torch.Tensor,
                fixations: torch.Tensor) -> torch.Tensor:
        """-> logits (B, T + 1, N + 1): row t scores fixation t over the N objects and the end (column N)."""
        self._check(object_features, object_positions, target_feature, fixations)
        objects = torch.cat((self.appearance(object_features), self.position_encoding(object_positions)), dim=-1)
        target = torch.cat((self.appearance(target_feature), self.target_slot.expand(target_feature.shape[0], -1)), dim=-1)
        memory = self.dropout(torch.cat((target[:, None], objects), dim=1))
        for block in self.encoder:
            memory = block(memory)
        fixated = objects.gather(1, fixations.long()[..., None].expand(-1, -1, self.dim))
        steps = torch.cat((self.start.expand(fixations.shape[0], 1, -1), fixated), dim=1)
        x = self.dropout(steps + sequence_encoding(steps.shape[1], self.dim, steps.device, steps.dtype))
        for block in self.decoder:
            x = block(x, memory)
        return self.object_scores(x, memory[:, 1:])

    def object_scores(self, steps: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
        """steps (B, S, dim), objects (B, N, dim) -> (B, S, N + 1): bilinear scores per head, readout, end column."""
        heads = self.readout.in_features
        d = self.score_decoder(steps).unflatten(-1, (heads, self.dim)).transpose(1, 2)  # (B, h, S, dim)
        e = self.score_encoder(objects).unflatten(-1, (heads, self.dim)).transpose(1, 2)  # (B, h, N, dim)
        scores = (d @ e.transpose(-1, -2)) / math.sqrt(self.dim)  # (B, h, S, N)
        scores = torch.cat((scores, scores.new_zeros(scores.shape[:-1] + (1,))), dim=-1)
        return self.readout(scores.permute(0, 2, 3, 1)).squeeze(-1)

    def _check(self, object_features, object_positions, target_feature, fixations) -> None:
        def shape_of(t):
            return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__

        if not isinstance(object_features, torch.Tensor) or object_features.dim() != 3 or object_features.shape[-1] != self.feature_dim:
            raise InvalidArgumentError("object_features", f"a tensor (B, N, {self.feature_dim})", shape_of(object_features))
        b, n = object_features.shape[:2]
        if n == 0:
            raise InvalidArgumentError("object_features", "at least one object (N >= 1)", shape_of(object_features))
        if not isinstance(object_positions, torch.Tensor) or tuple(object_positions.shape) != (b, n, 2):
            raise InvalidArgumentError("object_positions", f"shape {(b, n, 2)} (x, y per object)", shape_of(object_positions))
        if not isinstance(target_feature, torch.Tensor) or tuple(target_feature.shape) != (b, self.feature_dim):
            raise InvalidArgumentError("target_feature", f"shape {(b, self.feature_dim)}", shape_of(target_feature))
        if (not isinstance(fixations, torch.Tensor) or fixations.dim() != 2 or fixations.shape[0] != b
                or fixations.dtype not in (torch.int64, torch.int32)):
            got = f"{fixations.dtype} {shape_of(fixations)}" if isinstance(fixations, torch.Tensor) else shape_of(fixations)
            raise InvalidArgumentError("fixations", f"an integer tensor ({b}, T) of object indices", got)
        if not torch.compiler.is_compiling() and fixations.numel() and (int(fixations.min()) < 0 or int(fixations.max()) >= n):
            raise InvalidArgumentError("fixations", f"object indices in [0, {n})",
                                       f"range [{int(fixations.min())}, {int(fixations.max())}]")
