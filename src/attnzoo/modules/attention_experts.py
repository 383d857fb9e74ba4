"""BAM's mixture of attention experts, upcycled from dense attention layers.

Zhang et al., "BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts",
arXiv 2408.08274.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError, UnsupportedError, check_int
from ..method import Method
from ..nn import Attention, apply_rope
from ..registry import ComponentInfo
from . import AttentionModule, register


@dataclass(frozen=True)
class DenseLayer:
    """What :meth:`AttentionExperts.from_dense` reads from one dense attention layer: its shape and
    its q / k / v / out projections (``nn.Linear``)."""

    dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    rope: float | None
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    out: nn.Linear

    def shape(self) -> dict[str, Any]:
        """Everything the experts of one mixture must share."""
        return {"dim": self.dim, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                    "causal": self.causal, "rope": self.rope, "qkv_bias": self.q.bias is not None, "out_bias": self.out.bias is not None}


def read_dense_layer(layer: nn.Module, argument: str) -> DenseLayer:
    """The :class:`DenseLayer` of an ``attnzoo.nn.Attention`` or of a Hugging Face Llama-style
    attention (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and a ``config`` with
    ``num_attention_heads``, ``num_key_value_heads``, ``hidden_size`` and default rotary embeddings)."""
    if isinstance(layer, Attention):
        return DenseLayer(layer.dim, layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.causal, layer.rope,
                          layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj)
    config = getattr(layer, "config", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if config is None or not all(isinstance(getattr(layer, n, None), nn.Linear) for n in names):
        raise InvalidArgumentError(argument, "an attnzoo.nn.Attention or a Llama-style attention (q_proj, k_proj, v_proj, "
                                   "o_proj, config)", type(layer).__name__)
    if any(hasattr(layer, n) for n in ("q_norm", "k_norm")):
        raise UnsupportedError(f"{argument}: {type(layer).__name__} normalises q and k (q_norm / k_norm); "
                               "AttentionExperts upcycles plain q / k / v / o attention only")
    rope_parameters = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type != "default":
        raise UnsupportedError(f"{argument}: rotary embeddings of type {rope_type!r}; only the default (unscaled) type is read")
    theta = rope_parameters.get("rope_theta", getattr(config, "rope_theta", None))
    heads = config.num_attention_heads
    head_dim = getattr(layer, "head_dim", config.hidden_size // heads)
    return DenseLayer(config.hidden_size, heads, config.num_key_value_heads, head_dim, True,
                      None if theta is None else float(theta), layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj)


def _expert_parameter(*shape: int, fan_in: int) -> nn.Parameter:
    """Uniform in +-1/sqrt(fan_in), nn.Linear's default bound."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


@register
class AttentionExperts(AttentionModule):
    """A soft mixture of attention experts, x (B, N, dim) -> (B, N, dim).

    Paper: "BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts"
    (arXiv 2408.08274). Each of ``num_experts`` experts is a full multi-head attention (its own q,
    k, v and out projections; with ``share_kv=True`` one k and v projection serves every expert,
    BAM's KV-sharing variant). A linear router scores the experts per token; its softmax g (B, N, E)
    weighs the experts' outputs, y_t = sum_e g_te O_e(attention_e(x))_t. BAM routes attention
    softly (every expert, every token), the default; ``top_k`` keeps each token's k best experts,
    renormalised (every expert is still computed; with ``top_k=1`` the kept weight is 1 and the
    router gets no gradient). :meth:`from_dense` builds the mixture from dense
    attention layers (the expert models), averaging their k and v projections when KV is shared;
    the router starts random, as in the paper.

    All experts run in one attention call through attnzoo (``method``, default "dense", and
    ``**config``): the experts' heads are stacked as heads, so any method swaps in. ``num_kv_heads``
    < ``num_heads`` is grouped-query attention inside each expert; ``rope`` (a rotary base) rotates
    q and k at positions 0..N-1 (``attnzoo.nn.apply_rope``, the half-split convention of Llama).

    Absent from the paper: the FFN experts and the parallel attention-FFN block around this layer,
    the branch-and-train stage that makes the dense experts, expert parallelism and any load
    balancing loss.
    """

    info = ComponentInfo(
        name="AttentionExperts",
        title="BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts",
        arxiv="2408.08274",
        family=("module",),
        summary="soft mixture of attention experts upcycled from dense attention layers, optionally sharing k and v",
    )

    def __init__(self, dim: int, num_heads: int, num_experts: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, share_kv: bool = False, top_k: int | None = None,
                 method: str | Method = "dense", causal: bool = False, qkv_bias: bool = False, out_bias: bool = True,
                 rope: float | None = None, **config: Any):
        super().__init__()
        self.dim = check_int("dim", dim)
        self.num_experts = check_int("num_experts", num_experts)
        for name, flag in (("share_kv", share_kv), ("qkv_bias", qkv_bias), ("out_bias", out_bias)):
            if not isinstance(flag, bool):
                raise InvalidArgumentError(name, "a bool", repr(flag))
        self.share_kv = share_kv
        self.top_k = None if top_k is None else check_int("top_k", top_k)
        if self.top_k is not None and self.top_k > self.num_experts:
            raise InvalidArgumentError("top_k", f"None (soft routing) or at most num_experts={self.num_experts}", self.top_k)
        # one expert's attention: its checks (heads, head_dim, causal, rope) and its method
        self.attention = Attention(dim, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, method=method,
                                   causal=causal, rope=rope, **config)
        shape = self.attention
        for unused in ("q_proj", "k_proj", "v_proj", "out_proj"):
            delattr(shape, unused)  # the stacked expert projections below replace the template's own
        inner_q, inner_kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
        experts, kv_experts = self.num_experts, 1 if share_kv else self.num_experts
        self.q_weight = _expert_parameter(experts, inner_q, self.dim, fan_in=self.dim)
        self.k_weight = _expert_parameter(kv_experts, inner_kv, self.dim, fan_in=self.dim)
        self.v_weight = _expert_parameter(kv_experts, inner_kv, self.dim, fan_in=self.dim)
        self.out_weight = _expert_parameter(experts, self.dim, inner_q, fan_in=inner_q)
        self.q_bias = _expert_parameter(experts, inner_q, fan_in=self.dim) if qkv_bias else None
        self.k_bias = _expert_parameter(kv_experts, inner_kv, fan_in=self.dim) if qkv_bias else None
        self.v_bias = _expert_parameter(kv_experts, inner_kv, fan_in=self.dim) if qkv_bias else None
        self.out_bias = _expert_parameter(experts, self.dim, fan_in=inner_q) if out_bias else None
        self.router = nn.Linear(self.dim, self.num_experts, bias=False)

    @classmethod
    def from_dense(cls, layers: Sequence[nn.Module], *, share_kv: bool = False, top_k: int | None = None,
                   method: str | Method = "dense", **config: Any) -> AttentionExperts:
        """One expert per dense attention layer (``attnzoo.nn.Attention`` or Hugging Face Llama-style),
        their weights copied (k and v averaged with ``share_kv``); heads, head_dim, biases, causality
        and rotary base come from the layers and must agree. The experts' attention is ``method``
        (default "dense"; a layer's own method is not carried over); the router is freshly initialised."""
        if isinstance(layers, nn.Module) or not isinstance(layers, Sequence) or len(layers) == 0:
            raise InvalidArgumentError("layers", "a non-empty sequence of dense attention layers", type(layers).__name__)
        dense = [read_dense_layer(layer, f"layers[{i}]") for i, layer in enumerate(layers)]
        first = dense[0].shape()
        for i, layer in enumerate(dense[1:], start=1):
            if layer.shape() != first:
                raise InvalidArgumentError(f"layers[{i}]", f"the shape of layers[0] ({first})", layer.shape())
        ref = dense[0].q.weight
        mixture = cls(first["dim"], first["num_heads"], len(dense), num_kv_heads=first["num_kv_heads"],
                      head_dim=first["head_dim"], share_kv=share_kv, top_k=top_k, method=method, causal=first["causal"],
                      qkv_bias=first["qkv_bias"], out_bias=first["out_bias"], rope=first["rope"], **config)
        mixture.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for name in ("q", "k", "v", "out"):
                for kind in ("weight", "bias"):
                    target = getattr(mixture, f"{name}_{kind}")
                    if target is not None:
                        stacked = torch.stack([getattr(getattr(layer, name), kind) for layer in dense])
                        target.copy_(stacked if target.shape[0] == len(dense) else stacked.mean(0, keepdim=True))
        return mixture

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """The router's expert weights of each token, x (B, N, dim) -> (B, N, E), rows summing to 1
        (zero outside each token's ``top_k`` best experts). Softmax in float32, returned in x's dtype."""
        logits = self.router(x).float()
        if self.top_k is not None and self.top_k < self.num_experts:
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(self.top_k, dim=-1).indices, True)
            logits = logits.masked_fill(~keep, float("-inf"))
        return logits.softmax(-1).to(x.dtype)

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's attention output, x (B, N, dim) -> (B, N, E, dim), in one attention call."""
        self._check_input(x)
        shape = self.attention
        N, E = x.shape[1], self.num_experts
        q = self._project(x, self.q_weight, self.q_bias).unflatten(-1, (shape.num_heads, shape.head_dim))
        k = self._project(x, self.k_weight, self.k_bias).unflatten(-1, (shape.num_kv_heads, shape.head_dim))
        v = self._project(x, self.v_weight, self.v_bias).unflatten(-1, (shape.num_kv_heads, shape.head_dim))
        # q (B, N, E, Hq, D); k, v (B, N, E or 1, Hkv, D). Query head order: expert-major with
        # per-expert k/v, head-major with shared k/v, so grouped-query attention pairs each query
        # head with its own expert's (or the shared) kv head.
        q = (q if not self.share_kv else q.transpose(2, 3)).flatten(2, 3).transpose(1, 2)
        k, v = (t.flatten(2, 3).transpose(1, 2) for t in (k, v))
        if shape.rope is not None:
            positions = torch.arange(N, device=x.device)
            q, k = apply_rope(q, positions, shape.rope), apply_rope(k, positions, shape.rope)
        out = shape.method(q, k, v, causal=shape.causal, check_finite=False).transpose(1, 2)  # (B, N, heads, D)
        out = out.unflatten(2, (shape.num_heads, E) if self.share_kv else (E, shape.num_heads))
        out = (out.transpose(2, 3) if self.share_kv else out).flatten(3)  # (B, N, E, Hq * D)
        y = torch.einsum("bnei,eoi->bneo", out, self.out_weight.to(out.dtype))
        return y if self.out_bias is None else y + self.out_bias.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim): the experts' outputs weighted by :meth:`gates`."""
        return torch.einsum("bneo,bne->bno", self.expert_outputs(x), self.gates(x))

    @staticmethod
    def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (B, N, dim) through stacked projections (E, out, dim) [+ (E, out)] -> (B, N, E, out)."""
        y = torch.einsum("bnc,eoc->bneo", x, weight.to(x.dtype))
        return y if bias is None else y + bias.to(y.dtype)

    def _check_input(self, x: object) -> None:
        if not isinstance(x, torch.Tensor):
            raise InvalidArgumentError("x", "a torch.Tensor", type(x).__name__)
        if x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] == 0:
            raise InvalidArgumentError("x", f"a 3-D tensor (batch, tokens >= 1, {self.dim})", f"shape {tuple(x.shape)}")
        weight = self.q_weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise InvalidArgumentError("x", f"dtype {weight.dtype} (the parameters'; convert with .to() or use autocast)", x.dtype)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, share_kv={self.share_kv}, top_k={self.top_k}"
