"""DARE: target attention over a long user history with decoupled attention / representation embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..api import attention
from ..errors import InvalidArgumentError, check_int
from ..registry import ComponentInfo
from . import AttentionModule, register

_MASKED = -1.0e4  # logit given to a masked behaviour: exp underflows to exactly 0 in float32 and bfloat16


@register
class DecoupledTargetAttention(AttentionModule):
    """DARE (Feng et al., "Long-Sequence Recommendation Models Need Decoupled Embeddings",
    arXiv 2410.02604): target_items (B,), history_items (B, L), history_mask (B, L) bool -> click
    logits (B,) (and the attention weights (B, L) with ``return_attention=True``).

    Every item (and, with ``num_categories``, its category) has two embeddings: one of
    ``attention_dim`` channels used only to score history behaviours against the target, one of
    ``representation_dim`` channels used only to build the user representation. The history is
    searched with the target's attention embedding (``top_k``: keep the k best-scoring behaviours,
    the first stage of the two-stage paradigm; None: soft attention over the whole history), then
    the representation embeddings of the kept behaviours are summed under the softmax weights.
    The prediction MLP reads [target representation, user representation, their product]. The
    softmax runs through ``attnzoo.attention(..., method)``; the history mask enters as an extra
    query/key channel carrying a -1e4 logit, exact for methods that compute every logit (dense); a
    user with no valid behaviour gets a zero user representation. Absent: time embeddings, the
    official code's separate target and behaviour tables, and its ETA/SDIM retrieval variants.
    """

    info = ComponentInfo(
        name="DecoupledTargetAttention",
        title="Long-Sequence Recommendation Models Need Decoupled Embeddings",
        arxiv="2410.02604",
        family=("module",),
        summary="target attention over a user history with separate attention and representation embedding tables",
    )

    def __init__(self, num_items: int, *, num_categories: int | None = None, attention_dim: int = 16,
                 representation_dim: int = 16, top_k: int | None = None, mlp_dims: tuple[int, ...] = (200, 80),
                 method: str = "dense"):
        super().__init__()
        self.num_items = check_int("num_items", num_items)
        self.num_categories = None if num_categories is None else check_int("num_categories", num_categories)
        self.top_k = None if top_k is None else check_int("top_k", top_k)
        if not isinstance(method, str):
            raise InvalidArgumentError("method", "a registered attention method name", type(method).__name__)
        self.method = method
        fields = 1 if self.num_categories is None else 2
        attention_dim, representation_dim = check_int("attention_dim", attention_dim), check_int("representation_dim", representation_dim)
        self.item_attention = nn.Embedding(self.num_items, attention_dim)
        self.item_representation = nn.Embedding(self.num_items, representation_dim)
        if self.num_categories is not None:
            self.category_attention = nn.Embedding(self.num_categories, attention_dim)
            self.category_representation = nn.Embedding(self.num_categories, representation_dim)
        self.attention_width, self.representation_width = fields * attention_dim, fields * representation_dim
        layers, width = [], 3 * self.representation_width
        for i, hidden in enumerate(mlp_dims):
            layers += [nn.Linear(width, check_int(f"mlp_dims[{i}]", hidden)), nn.PReLU()]
            width = hidden
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, target_items: torch.Tensor, history_items: torch.Tensor, history_mask: torch.Tensor, *,
                target_categories: torch.Tensor | None = None, history_categories: torch.Tensor | None = None,
                return_attention: bool = False):
        """target_items (B,), history_items (B, L), history_mask (B, L) bool [, categories of the same
        shapes] -> logits (B,) [, attention weights (B, L)]."""
        self._check(target_items, history_items, history_mask, target_categories, history_categories)
        q = self._embed(target_items, target_categories, "attention")  # (B, Da)
        k = self._embed(history_items, history_categories, "attention")  # (B, L, Da)
        v = self._embed(history_items, history_categories, "representation")  # (B, L, Dr)
        scale = 1.0 / math.sqrt(self.attention_width)
        keep = history_mask
        if self.top_k is not None and self.top_k < history_items.shape[1]:
            logits = torch.einsum("bd,bld->bl", q, k).masked_fill(~history_mask, float("-inf"))
            chosen = logits.topk(self.top_k, dim=-1).indices
            keep = history_mask & torch.zeros_like(history_mask).scatter(1, chosen, True)
        bias = torch.where(keep, 0.0, _MASKED / scale).to(k.dtype)  # logit bias of each behaviour, pre-scale
        q1 = torch.cat((q, torch.ones_like(q[:, :1])), dim=-1)[:, None, None]  # (B, 1, 1, Da + 1)
        k1 = torch.cat((k, bias[..., None]), dim=-1)[:, None]  # (B, 1, L, Da + 1)
        any_kept = keep.any(dim=-1, keepdim=True).to(v.dtype)
        if return_attention:  # the weights: attention over one-hot values (the history positions)
            eye = torch.eye(k.shape[1], dtype=v.dtype, device=v.device).expand(k.shape[0], 1, -1, -1)
            v = torch.cat((v, eye[:, 0]), dim=-1)
        pooled = attention(q1, k1, v[:, None], self.method, scale=scale, check_finite=False)[:, 0, 0] * any_kept
        user, weights = pooled[:, :self.representation_width], pooled[:, self.representation_width:]
        target = self._embed(target_items, target_categories, "representation")
        logits = self.mlp(torch.cat((target, user, target * user), dim=-1)).squeeze(-1)
        return (logits, weights) if return_attention else logits

    def _embed(self, items: torch.Tensor, categories: torch.Tensor | None, kind: str) -> torch.Tensor:
        out = getattr(self, f"item_{kind}")(items)
        if self.num_categories is None:
            return out
        return torch.cat((out, getattr(self, f"category_{kind}")(categories)), dim=-1)

    def _check(self, target_items, history_items, history_mask, target_categories, history_categories) -> None:
        _check_ids("target_items", target_items, None, self.num_items)
        batch = target_items.shape[0]
        _check_ids("history_items", history_items, batch, self.num_items)
        if not isinstance(history_mask, torch.Tensor) or history_mask.dtype != torch.bool or history_mask.shape != history_items.shape:
            got = (f"{history_mask.dtype} shape {tuple(history_mask.shape)}" if isinstance(history_mask, torch.Tensor)
                   else type(history_mask).__name__)
            raise InvalidArgumentError("history_mask", f"a bool tensor of shape {tuple(history_items.shape)}", got)
        if self.num_categories is None:
            for name, given in (("target_categories", target_categories), ("history_categories", history_categories)):
                if given is not None:
                    raise InvalidArgumentError(name, "None (the module was built without num_categories)", "a tensor")
            return
        _check_ids("target_categories", target_categories, None, self.num_categories, like=target_items)
        _check_ids("history_categories", history_categories, batch, self.num_categories, like=history_items)


def _check_ids(name: str, ids: object, batch: int | None, vocabulary: int, like: torch.Tensor | None = None) -> None:
    """ids: an integer tensor (B,) when batch is None, else (batch, L), values in [0, vocabulary)."""
    rank, expected = (1, "(B,)") if batch is None else (2, f"({batch}, L)")
    if like is not None:
        expected = f"shape {tuple(like.shape)}"
    ok_shape = isinstance(ids, torch.Tensor) and ids.dim() == rank and (batch is None or ids.shape[0] == batch)
    if like is not None and ok_shape:
        ok_shape = ids.shape == like.shape
    if not ok_shape or ids.dtype not in (torch.int64, torch.int32):
        got = f"{ids.dtype} shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise InvalidArgumentError(name, f"an integer tensor {expected}", got)
    if not torch.compiler.is_compiling() and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocabulary):
        raise InvalidArgumentError(name, f"ids in [0, {vocabulary})", f"range [{int(ids.min())}, {int(ids.max())}]")
