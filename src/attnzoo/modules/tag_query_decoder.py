"""RAM++'s image-tag recognition decoder: tag queries built from semantic concept embeddings cross-attend to the image."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError, check_int
from ..method import Method
from ..registry import ComponentInfo, as_method
from . import AttentionModule, register
from ._checks import check_tensor


class _TagLayer(nn.Module):
    """One post-norm BERT layer without self-attention: tags (B, T, hidden) read image (B, N, concept_dim)."""

    def __init__(self, hidden_dim: int, concept_dim: int, num_heads: int, mlp_dim: int, method: Any,
                 config: dict[str, Any]):
        super().__init__()
        if hidden_dim % num_heads:
            raise InvalidArgumentError("hidden_dim", f"a multiple of num_heads={num_heads}", hidden_dim)
        self.num_heads, self.head_dim = num_heads, hidden_dim // num_heads
        self.q_proj = nn.Linear(hidden_dim, hidden_dim)
        self.k_proj = nn.Linear(concept_dim, hidden_dim)
        self.v_proj = nn.Linear(concept_dim, hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)
        self.norm_attention = nn.LayerNorm(hidden_dim, eps=1e-12)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, hidden_dim))
        self.norm_mlp = nn.LayerNorm(hidden_dim, eps=1e-12)
        self.method = as_method(method, **config)
        self.method.materialize(num_heads, num_heads, self.head_dim, self.head_dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, tags: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(tags)), self._heads(self.k_proj(image)), self._heads(self.v_proj(image))
        read = self.method(q, k, v, causal=False, check_finite=False).transpose(1, 2).flatten(2)
        tags = self.norm_attention(tags + self.out_proj(read))
        return self.norm_mlp(tags + self.mlp(tags))


@register
class TagQueryDecoder(AttentionModule):
    """RAM++ tagging head: image (B, N, concept_dim) with its global token first -> tag logits (B, num_tags).

    Huang et al., "Open-Set Image Tagging with Multi-Grained Text Supervision" (RAM++, arXiv
    2310.15200). Each tag has ``num_descriptions`` frozen text embeddings of its (LLM-written)
    visual descriptions, the buffer ``descriptions`` (num_tags, num_descriptions, concept_dim);
    replace it with your text encoder's embeddings (random unit vectors until then). Per image the
    descriptions of a tag are weighted by softmax over descriptions of exp(s) * cos(global image
    token, description) (``s`` learned, initialised to log(1/0.07)) and summed: the tag's concept
    embedding; ReLU(Linear) of it is the tag query. ``num_layers`` post-norm layers of
    cross-attention (queries: tags; keys/values: all image tokens; no self-attention among tags,
    as in RAM++) and a GELU MLP; a linear head gives one logit per tag. Open-set tagging: pass
    other ``descriptions`` to forward. ``method`` (default "dense") and ``**config`` choose the attention.

    Absent: the Swin image encoder and its projection to concept_dim, the CLIP text encoder and the
    LLM tag descriptions, the asymmetric tagging / alignment / distillation losses, per-tag
    thresholds, attention masks over padded image tokens, and dropout.
    """

    info = ComponentInfo(
        name="TagQueryDecoder", title="Open-Set Image Tagging with Multi-Grained Text Supervision", arxiv="2310.15200",
        family=("module",),
        summary="RAM++ tagging decoder: description-weighted concept embeddings as tag queries cross-attending to the image")

    def __init__(self, num_tags: int, *, num_descriptions: int = 1, concept_dim: int = 512, hidden_dim: int = 768,
                 num_heads: int = 4, num_layers: int = 2, mlp_dim: int = 3072, method: str | Method = "dense", **config: Any):
        super().__init__()
        self.num_tags = check_int("num_tags", num_tags)
        self.num_descriptions = check_int("num_descriptions", num_descriptions)
        self.concept_dim = check_int("concept_dim", concept_dim)
        hidden_dim, num_heads = check_int("hidden_dim", hidden_dim), check_int("num_heads", num_heads)
        descriptions = torch.randn(self.num_tags, self.num_descriptions, self.concept_dim)
        self.register_buffer("descriptions", nn.functional.normalize(descriptions, dim=-1))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.query_proj = nn.Linear(self.concept_dim, hidden_dim)
        self.layers = nn.ModuleList(_TagLayer(hidden_dim, self.concept_dim, num_heads, check_int("mlp_dim", mlp_dim),
                                              method, config) for _ in range(check_int("num_layers", num_layers)))
        self.head = nn.Linear(hidden_dim, 1)

    def concept_embeddings(self, image_global: torch.Tensor, descriptions: torch.Tensor | None = None) -> torch.Tensor:
        """image_global (B, concept_dim) -> each tag's description-weighted embedding (B, T, concept_dim)."""
        descriptions = self._descriptions(descriptions)
        check_tensor("image_global", image_global, (None, self.concept_dim), f"(batch, {self.concept_dim})",
                     self.query_proj.weight.dtype)
        cosine = torch.einsum("bc,tdc->btd", nn.functional.normalize(image_global, dim=-1), descriptions)
        weights = (self.logit_scale.exp() * cosine).softmax(dim=-1)  # over each tag's descriptions
        return torch.einsum("btd,tdc->btc", weights, descriptions)

    def forward(self, image: torch.Tensor, descriptions: torch.Tensor | None = None) -> torch.Tensor:
        """image (B, N, concept_dim), token 0 the global one; descriptions (T, D, concept_dim) or the buffer -> (B, T)."""
        check_tensor("image", image, (None, None, self.concept_dim), f"(batch, tokens, {self.concept_dim})",
                     self.query_proj.weight.dtype)
        tags = torch.relu(self.query_proj(self.concept_embeddings(image[:, 0], descriptions)))
        for layer in self.layers:
            tags = layer(tags, image)
        return self.head(tags).squeeze(-1)

    def _descriptions(self, descriptions: torch.Tensor | None) -> torch.Tensor:
        if descriptions is None:
            return self.descriptions
        return check_tensor("descriptions", descriptions, (None, None, self.concept_dim),
                            f"(tags, descriptions per tag, {self.concept_dim})", self.query_proj.weight.dtype)

    def extra_repr(self) -> str:
        return (f"num_tags={self.num_tags}, num_descriptions={self.num_descriptions}, concept_dim={self.concept_dim}, "
                f"num_layers={len(self.layers)}")
