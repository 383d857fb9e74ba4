"""``attnzoo.nn.Attention``: a multi-head attention layer whose attention is any registered method.

    layer = attnzoo.nn.Attention(384, 6, method="neighborhood", grid=(14, 14), kernel_size=7)
    y = layer(x)                       # x (B, N, 384) -> (B, N, 384)

q/k/v/out projections around ``attnzoo.get_method(method, **config)``; grouped-query attention when
``num_kv_heads < num_heads``; cross-attention with ``context``; optional rotary position embeddings.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import distributed
from .errors import InvalidArgumentError, check_int
from .kernels.dense import work_dtype
from .method import Method
from .registry import as_method


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding, half-split convention: x (..., N, D) with D even, positions (N,).

    Channel i < D/2 is paired with channel i + D/2 and the pair is rotated by the angle
    ``positions[n] * base ** (-2 i / D)``; so the dot product of a query rotated at position p and a
    key rotated at position r depends on p - r only. Computed in float32 (float64 stays float64);
    returns x's dtype.
    """
    if x.dim() < 2 or x.shape[-1] % 2:
        raise InvalidArgumentError("x", "a tensor (..., N, D) with an even D (channels rotate in pairs)", f"shape {tuple(x.shape)}")
    if positions.shape != (x.shape[-2],):
        raise InvalidArgumentError("positions", f"shape ({x.shape[-2]},) (one per token of x)", f"shape {tuple(positions.shape)}")
    work = work_dtype(x)
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=work) / half)
    angle = positions.to(work)[:, None] * inv_freq  # (N, D/2)
    cos, sin = angle.cos(), angle.sin()
    first, second = x.to(work).split(half, dim=-1)
    rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return rotated.to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention, x (B, N, dim) [, context (B, M, dim)] -> (B, N, dim), running any attnzoo method.

    ``num_heads`` query heads and ``num_kv_heads`` (default ``num_heads``) key/value heads of
    ``head_dim`` channels (default ``dim // num_heads``); ``method``: a registered name, configured
    with ``**config`` (e.g. ``window=``, or ``grid=`` and ``num_global=`` for spatial methods), or a
    configured :class:`attnzoo.Method` (then no ``config``). The method is a submodule, so what a
    learned method learns trains with the layer and lands in ``state_dict``. ``causal``: causal
    attention (bottom-right aligned for cross-attention). ``rope``: None, or the base of rotary
    position embeddings (e.g. 10000.0, see :func:`apply_rope`) applied to q and k at positions
    0..N-1, for self-attention. Computation follows the parameters' dtype (or autocast). Inputs are
    not scanned for NaN / inf (that costs a host sync per layer; call the method directly for it).
    ``process_group``: a torch.distributed group over which x is sharded along its tokens
    (contiguously, lengths may differ); attention then runs context-parallel
    (:func:`attnzoo.distributed.attention`), rotary positions are the shard's own, and the model
    trains sequence-parallel (sum the parameters' gradients over the group, as data parallelism does).
    """

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
                 method: str | Method = "dense", causal: bool = False, qkv_bias: bool = False, out_bias: bool = True,
                 rope: float | None = None, process_group=None, **config: Any):
        super().__init__()
        self.dim = check_int("dim", dim)
        self.num_heads = check_int("num_heads", num_heads)
        self.num_kv_heads = self.num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise InvalidArgumentError("num_heads", f"a multiple of num_kv_heads={self.num_kv_heads} (grouped-query attention)",
                                       self.num_heads)
        if head_dim is None:
            if self.dim % self.num_heads:
                raise InvalidArgumentError("dim", f"a multiple of num_heads={self.num_heads} (or pass head_dim)", self.dim)
            head_dim = self.dim // self.num_heads
        self.head_dim = check_int("head_dim", head_dim)
        for name, flag in (("causal", causal), ("qkv_bias", qkv_bias), ("out_bias", out_bias)):
            if not isinstance(flag, bool):
                raise InvalidArgumentError(name, "a bool", repr(flag))
        self.causal = causal
        self.rope = self._check_rope(rope)
        self.method = as_method(method, **config)
        self.process_group = process_group

        inner_q, inner_kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(self.dim, inner_q, bias=qkv_bias)
        self.k_proj = nn.Linear(self.dim, inner_kv, bias=qkv_bias)
        self.v_proj = nn.Linear(self.dim, inner_kv, bias=qkv_bias)
        self.out_proj = nn.Linear(inner_q, self.dim, bias=out_bias)
        self.method.materialize(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim)

    def _check_rope(self, rope: object) -> float | None:
        if rope is None:
            return None
        if isinstance(rope, bool) or not isinstance(rope, (int, float)) or not math.isfinite(rope) or rope <= 1:
            raise InvalidArgumentError("rope", "None or a finite rotary base > 1 (e.g. 10000.0)", repr(rope))
        if self.head_dim % 2:
            raise InvalidArgumentError("head_dim", "an even number with rope (channels rotate in pairs)", self.head_dim)
        return float(rope)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim); ``context`` (B, M, dim) gives the keys and values (cross-attention)."""
        self._check_input("x", x)
        if context is not None:
            self._check_input("context", context)
            if context.shape[0] != x.shape[0]:
                raise InvalidArgumentError("context", f"batch size {x.shape[0]} (from x)", context.shape[0])
            if self.process_group is not None:
                raise InvalidArgumentError("context", "None with process_group (context parallelism shards self-attention)",
                                           f"shape {tuple(context.shape)}")
            if self.rope is not None:
                raise InvalidArgumentError("context", "None when rope is set (rotary embeddings are for self-attention)",
                                           f"shape {tuple(context.shape)}")
        source = x if context is None else context
        q = self._heads(self.q_proj(x), self.num_heads)
        k = self._heads(self.k_proj(source), self.num_kv_heads)
        v = self._heads(self.v_proj(source), self.num_kv_heads)
        if self.rope is not None:
            positions = torch.arange(x.shape[1], device=x.device) if self.process_group is None else \
                distributed.shard_positions(x.shape[1], group=self.process_group, device=x.device)
            q, k = apply_rope(q, positions, self.rope), apply_rope(k, positions, self.rope)
        if self.process_group is None:
            out = self.method(q, k, v, causal=self.causal, check_finite=False)  # (B, H, N, head_dim)
        else:
            out = distributed.attention(q, k, v, self.method, group=self.process_group, causal=self.causal)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        """(B, N, heads * head_dim) -> (B, heads, N, head_dim)."""
        return t.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)

    def _check_input(self, name: str, t: object) -> None:
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(name, "a torch.Tensor", type(t).__name__)
        if t.dim() != 3 or t.shape[-1] != self.dim:
            raise InvalidArgumentError(name, f"a 3-D tensor (batch, tokens, {self.dim})", f"shape {tuple(t.shape)}")
        weight = self.q_proj.weight
        if t.device != weight.device:
            raise InvalidArgumentError(name, f"a tensor on {weight.device} (the parameters' device)", t.device)
        if t.dtype != weight.dtype and not torch.is_autocast_enabled(t.device.type):
            raise InvalidArgumentError(name, f"dtype {weight.dtype} (the parameters'; convert with .to() or use autocast)",
                                       t.dtype)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}, rope={self.rope}")
