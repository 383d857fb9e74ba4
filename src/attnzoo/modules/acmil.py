"""ACMIL: multiple-branch gated attention pooling with stochastic top-K instance masking."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError, check_float, check_int
from ..registry import ComponentInfo
from . import AttentionModule, register


class ACMILOutput(NamedTuple):
    """What :class:`ACMIL` returns for B bags of N instances, M branches and C classes."""

    bag_logits: torch.Tensor  # (B, C): the slide classifier on the branch-averaged attention pooling
    branch_logits: torch.Tensor  # (B, M, C): one classifier per branch on its own pooling
    attention: torch.Tensor  # (B, M, N): each branch's softmax over the instances (0 where masked or padded)
    instance_scores: torch.Tensor  # (B, N): the branch-averaged attention, the score for instance AUC


@register
class ACMIL(AttentionModule):
    """Attention-Challenging MIL (Zhang et al., "Attention-Challenging Multiple Instance Learning for
    Whole Slide Image Classification", arXiv 2311.07125): bags (B, N, in_dim) [+ instance_mask (B, N)]
    -> :class:`ACMILOutput`.

    Instances are reduced (Linear + ReLU to ``hidden_dim``) and scored by ``num_branches`` gated
    attention branches (Multiple Branch Attention: ``w_m . (tanh(V h) * sigmoid(U h))``). In training,
    Stochastic Top-K Instance Masking drops, per branch, ``floor(mask_prob * K')`` instances chosen at
    random among its ``K' = min(top_k, valid instances)`` highest scores before the softmax, so their
    attention goes to the rest. Each branch pools the instances with its softmax and has its own
    classifier; the bag classifier reads the pooling under the branches' mean attention.
    :meth:`loss` adds the branches' cross-entropy, the bag's and the diversity constraint (mean
    pairwise cosine similarity of the branches' attention). ``instance_mask`` marks real instances
    (True) in padded batches. Absent: the feature extractor (instances are pre-extracted features)
    and the multi-head-attention variant of the official code.
    """

    info = ComponentInfo(
        name="ACMIL",
        title="Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification",
        arxiv="2311.07125",
        family=("module",),
        summary="multiple-branch gated attention MIL with a diversity loss and stochastic top-K instance masking",
    )

    def __init__(self, in_dim: int, *, num_classes: int = 2, hidden_dim: int = 128, attention_dim: int = 128,
                 num_branches: int = 5, top_k: int = 10, mask_prob: float = 0.6):
        super().__init__()
        self.in_dim = check_int("in_dim", in_dim)
        self.num_classes = check_int("num_classes", num_classes, minimum=2)
        self.num_branches = check_int("num_branches", num_branches)
        self.top_k = check_int("top_k", top_k, minimum=0)
        self.mask_prob = check_float("mask_prob", mask_prob, low=0.0, high=1.0)
        if self.mask_prob == 1.0:
            raise InvalidArgumentError("mask_prob", "a number in [0, 1) (1 would mask every top instance)", mask_prob)
        hidden_dim, attention_dim = check_int("hidden_dim", hidden_dim), check_int("attention_dim", attention_dim)
        self.reduce = nn.Sequential(nn.Linear(self.in_dim, hidden_dim), nn.ReLU())
        self.attention_tanh = nn.Linear(hidden_dim, attention_dim)
        self.attention_gate = nn.Linear(hidden_dim, attention_dim)
        self.attention_out = nn.Linear(attention_dim, self.num_branches)
        self.branch_weight = nn.Parameter(torch.empty(self.num_branches, self.num_classes, hidden_dim))
        self.branch_bias = nn.Parameter(torch.zeros(self.num_branches, self.num_classes))
        nn.init.kaiming_uniform_(self.branch_weight.view(-1, hidden_dim), a=5 ** 0.5)
        self.bag_classifier = nn.Linear(hidden_dim, self.num_classes)

    def forward(self, bags: torch.Tensor, instance_mask: torch.Tensor | None = None) -> ACMILOutput:
        """bags (B, N, in_dim), instance_mask (B, N) bool (True: a real instance) -> ACMILOutput."""
        valid = self._check(bags, instance_mask)
        h = self.reduce(bags)  # (B, N, hidden)
        scores = self.attention_out(torch.tanh(self.attention_tanh(h)) * torch.sigmoid(self.attention_gate(h)))
        scores = scores.transpose(1, 2)  # (B, M, N)
        dropped = ~valid[:, None, :]
        if self.training and self.top_k > 0 and self.mask_prob > 0:
            dropped = dropped | self._top_k_mask(scores, valid)
        attention = torch.softmax(scores.masked_fill(dropped, float("-inf")), dim=-1)
        pooled = attention @ h  # (B, M, hidden)
        branch_logits = torch.einsum("bmh,mch->bmc", pooled, self.branch_weight) + self.branch_bias
        instance_scores = attention.mean(dim=1)  # (B, N)
        bag_logits = self.bag_classifier((instance_scores.unsqueeze(1) @ h).squeeze(1))
        return ACMILOutput(bag_logits, branch_logits, attention, instance_scores)

    def _top_k_mask(self, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, M, N) bool: per branch, floor(mask_prob * K') instances drawn uniformly among its K' top scores."""
        rank = scores.masked_fill(~valid[:, None, :], float("-inf")).argsort(dim=-1, descending=True).argsort(dim=-1)
        top = valid.sum(dim=-1).clamp(max=self.top_k)[:, None, None]  # K' per bag
        in_top = rank < top
        priority = torch.where(in_top, torch.rand(scores.shape, device=scores.device), torch.full_like(scores, 2.0))
        draw_rank = priority.argsort(dim=-1).argsort(dim=-1)
        return in_top & (draw_rank < (top * self.mask_prob).floor().long())

    def diversity_loss(self, attention: torch.Tensor) -> torch.Tensor:
        """Mean cosine similarity over the pairs of branches of attention (B, M, N), averaged over bags (0 for M = 1)."""
        m = attention.shape[1]
        if m < 2:
            return attention.new_zeros(())
        unit = F.normalize(attention.float(), dim=-1)
        similarity = unit @ unit.transpose(1, 2)  # (B, M, M)
        off_diagonal = similarity.sum(dim=(1, 2)) - similarity.diagonal(dim1=1, dim2=2).sum(dim=-1)
        return (off_diagonal / (m * (m - 1))).mean()

    def loss(self, output: ACMILOutput, labels: torch.Tensor) -> torch.Tensor:
        """The training objective: cross-entropy of every branch and of the bag plus the diversity loss; labels (B,)."""
        if labels.shape != output.bag_logits.shape[:1]:
            raise InvalidArgumentError("labels", f"shape ({output.bag_logits.shape[0]},) (one class per bag)",
                                       f"shape {tuple(labels.shape)}")
        branch = F.cross_entropy(output.branch_logits.flatten(0, 1).float(), labels.repeat_interleave(self.num_branches))
        return branch + F.cross_entropy(output.bag_logits.float(), labels) + self.diversity_loss(output.attention)

    def _check(self, bags: object, instance_mask: object) -> torch.Tensor:
        if not isinstance(bags, torch.Tensor) or bags.dim() != 3 or bags.shape[-1] != self.in_dim:
            got = f"shape {tuple(bags.shape)}" if isinstance(bags, torch.Tensor) else type(bags).__name__
            raise InvalidArgumentError("bags", f"a tensor (B, N, {self.in_dim})", got)
        if bags.shape[1] == 0:
            raise InvalidArgumentError("bags", "at least one instance per bag (N >= 1)", f"shape {tuple(bags.shape)}")
        if instance_mask is None:
            return torch.ones(bags.shape[:2], dtype=torch.bool, device=bags.device)
        if not isinstance(instance_mask, torch.Tensor) or instance_mask.dtype != torch.bool or instance_mask.shape != bags.shape[:2]:
            got = (f"{instance_mask.dtype} shape {tuple(instance_mask.shape)}" if isinstance(instance_mask, torch.Tensor)
                   else type(instance_mask).__name__)
            raise InvalidArgumentError("instance_mask", f"a bool tensor of shape {tuple(bags.shape[:2])}", got)
        if not torch.compiler.is_compiling() and not bool(instance_mask.any(dim=1).all()):
            empty = (~instance_mask.any(dim=1)).nonzero().flatten().tolist()
            raise InvalidArgumentError("instance_mask", "at least one real instance in every bag", f"empty bags {empty}")
        return instance_mask
