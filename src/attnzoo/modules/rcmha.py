"""RCMHA: multi-head self-attention with depth-wise convolved q/k/v and relative position scores.

Sugiharto, Aradea, Mubarok, "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language
Modelling", arXiv 2308.03429.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError, check_int
from ..kernels.dense import work_dtype
from ..method import Method
from ..registry import ComponentInfo, as_method
from . import AttentionModule, register


def relative_frequencies(pos_dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The pos_dim / 2 angular frequencies of the sinusoid relative encoding, 10000 ** (-2 f / pos_dim)."""
    return 10000.0 ** (-torch.arange(0, pos_dim, 2, device=device, dtype=dtype) / pos_dim)


@register
class RCMHA(AttentionModule):
    """Relative convolutional multi-head self-attention, x (B, N, dim) -> (B, N, dim).

    Paper: "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling"
    (arXiv 2308.03429). Per head, q, k and v are linear projections followed by a causal
    depth-wise convolution along the tokens (``kernel_size`` taps, one filter per head channel,
    shared by the heads, as in the authors' code); the score of query i and key j is
    Transformer-XL's relative score

        ((q_i + u) . k_j + (q_i + w) . W_R r(i - j)) / sqrt(head_dim),

    with r(t) = [sin(t f), cos(t f)] over ``pos_dim / 2`` frequencies f, W_R a learned
    (pos_dim -> heads * head_dim) projection and u, w learned per-head biases.

    The attention runs through attnzoo: ``method`` (default "dense", or a configured Method) and
    ``**config`` choose it, e.g. ``RCMHA(128, 8, method="sliding_window", window=64)``. Since
    sin/cos of (i - j) split into products of sin/cos of i and of j, the relative term is exactly a
    dot product of per-token vectors: the executors get q' = [q + u, a_i, b_i] and
    k' = [k, cos(j f), sin(j f)] (head_dim + pos_dim channels, v unchanged), so every method that
    takes q, k and v computes the relative scores on the pairs it attends to, with no additive
    bias. Kernel (linear) methods apply their feature map to q', k', i.e. the relative term enters
    their kernel rather than a softmax logit.

    Absent from the paper's setup: Transformer-XL's segment memory (recurrence over previous
    segments), dropout, and the authors' free per-offset tables (their labml code learns one key
    embedding and bias per offset up to 4096; that table cannot be split into per-token vectors,
    so this module keeps Transformer-XL's sinusoid form). Self-attention only.
    """

    info = ComponentInfo(
        name="RCMHA",
        title="RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling",
        arxiv="2308.03429",
        family=("module",),
        summary="multi-head self-attention with causal depth-wise convolved q/k/v and Transformer-XL relative scores",
    )

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, kernel_size: int = 3,
                 pos_dim: int | None = None, causal: bool = True, qkv_bias: bool = False, out_bias: bool = True,
                 method: str | Method = "dense", **config: Any):
        super().__init__()
        self.dim = check_int("dim", dim)
        self.num_heads = check_int("num_heads", num_heads)
        if head_dim is None:
            if self.dim % self.num_heads:
                raise InvalidArgumentError("dim", f"a multiple of num_heads={self.num_heads} (or pass head_dim)", self.dim)
            head_dim = self.dim // self.num_heads
        self.head_dim = check_int("head_dim", head_dim)
        self.kernel_size = check_int("kernel_size", kernel_size)
        self.pos_dim = check_int("pos_dim", self.dim if pos_dim is None else pos_dim, minimum=2)
        if self.pos_dim % 2:
            raise InvalidArgumentError("pos_dim", "an even number (sin and cos per frequency)", self.pos_dim)
        for name, flag in (("causal", causal), ("qkv_bias", qkv_bias), ("out_bias", out_bias)):
            if not isinstance(flag, bool):
                raise InvalidArgumentError(name, "a bool", repr(flag))
        self.causal = causal
        self.method = as_method(method, **config)

        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(self.dim, inner, bias=qkv_bias)
        self.k_proj = nn.Linear(self.dim, inner, bias=qkv_bias)
        self.v_proj = nn.Linear(self.dim, inner, bias=qkv_bias)
        self.q_conv, self.k_conv, self.v_conv = (
            nn.Conv1d(self.head_dim, self.head_dim, self.kernel_size, groups=self.head_dim) for _ in range(3))
        self.pos_proj = nn.Linear(self.pos_dim, inner, bias=False)  # W_R
        self.content_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))  # u
        self.position_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))  # w
        self.out_proj = nn.Linear(inner, self.dim, bias=out_bias)
        self.method.materialize(self.num_heads, self.num_heads, self.head_dim + self.pos_dim, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim)."""
        self._check_input(x)
        q, k, v = (self._convolve(conv, self._heads(proj(x)))
                   for proj, conv in ((self.q_proj, self.q_conv), (self.k_proj, self.k_conv), (self.v_proj, self.v_conv)))
        q_rel, k_rel = self.relative_qk(q, k)
        out = self.method(q_rel, k_rel, v, causal=self.causal, scale=1.0 / math.sqrt(self.head_dim), check_finite=False)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def relative_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (B, H, N, head_dim) -> q', k' (B, H, N, head_dim + pos_dim) whose dot products are the
        content plus relative position scores (unscaled). Positions are computed in float32 (float64
        stays float64) and returned in q's dtype."""
        work = work_dtype(q)
        positions = torch.arange(q.shape[2], device=q.device, dtype=work)
        angle = positions[:, None] * relative_frequencies(self.pos_dim, q.device, work)  # (N, pos_dim / 2)
        sin, cos = angle.sin(), angle.cos()
        w_r = self.pos_proj.weight.to(work).unflatten(0, (self.num_heads, self.head_dim))  # (H, head_dim, pos_dim)
        coeff = torch.einsum("bhnd,hdr->bhnr", q.to(work) + self.position_bias.to(work)[:, None], w_r)
        c_sin, c_cos = coeff.chunk(2, dim=-1)  # coefficients of sin((i - j) f) and cos((i - j) f)
        along_cos_j = c_sin * sin + c_cos * cos
        along_sin_j = c_cos * sin - c_sin * cos
        q_rel = torch.cat((q + self.content_bias.to(q.dtype)[:, None], along_cos_j.to(q.dtype), along_sin_j.to(q.dtype)), -1)
        keys_pos = torch.cat((cos, sin), -1).to(k.dtype).expand(*k.shape[:2], -1, -1)
        return q_rel, torch.cat((k, keys_pos), -1)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, H * head_dim) -> (B, H, N, head_dim)."""
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _convolve(self, conv: nn.Conv1d, t: torch.Tensor) -> torch.Tensor:
        """Causal depth-wise convolution along the tokens of t (B, H, N, head_dim), same shape."""
        B, H, N, D = t.shape
        padded = F.pad(t.reshape(B * H, N, D).transpose(1, 2), (self.kernel_size - 1, 0))
        return conv(padded).transpose(1, 2).reshape(B, H, N, D)

    def _check_input(self, x: object) -> None:
        if not isinstance(x, torch.Tensor):
            raise InvalidArgumentError("x", "a torch.Tensor", type(x).__name__)
        if x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] == 0:
            raise InvalidArgumentError("x", f"a 3-D tensor (batch, tokens >= 1, {self.dim})", f"shape {tuple(x.shape)}")
        weight = self.q_proj.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise InvalidArgumentError("x", f"dtype {weight.dtype} (the parameters'; convert with .to() or use autocast)", x.dtype)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, kernel_size={self.kernel_size}, "
                f"pos_dim={self.pos_dim}, causal={self.causal}")
