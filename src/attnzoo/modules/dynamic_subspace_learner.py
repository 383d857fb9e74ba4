"""Attention-based dynamic subspace learners: an attention-pooled embedding split into growing learners."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError, check_float, check_int
from ..registry import ComponentInfo
from . import AttentionModule, register


@register
class DynamicSubspaceLearner(AttentionModule):
    """Dynamic subspace learners (Adiga Vasudeva, Dolz, Lombaert, "Attention-based Dynamic Subspace
    Learners for Medical Image Analysis", arXiv 2206.09068): features (B, C, H, W) -> embeddings
    (B, embedding_dim) (and the attention map (B, 1, H, W) with ``return_attention=True``).

    A spatial attention map (three 3x3 convolutions, C -> C/8 -> C/32 -> 1, ReLU between, sigmoid)
    gates the backbone features, which are average-pooled and embedded by one linear layer. The
    embedding is split into subspace learners (disjoint sets of neurons, ``learner_of``), each
    L2-normalised on its own, so each learner is a metric on its own subspace. Training starts with
    ``num_learners`` learners and adds more with :meth:`grow`: the neurons of the growing (last)
    learner whose normalised Taylor importance (:meth:`taylor_scores`, |mean activation x gradient|
    scaled to [0, 1]) exceeds ``threshold`` are copied into a new learner and the rest are
    re-initialised to keep learning. Absent: the ResNet-50 backbone, the margin loss and the
    per-learner clustering of the training data, and the plateau schedule that decides when to grow.
    """

    info = ComponentInfo(
        name="DynamicSubspaceLearner",
        title="Attention-based Dynamic Subspace Learners for Medical Image Analysis",
        arxiv="2206.09068",
        family=("module",),
        summary="attention-gated pooled embedding split into subspace learners that grow during training",
    )

    def __init__(self, in_channels: int, *, embedding_dim: int = 128, num_learners: int = 1, dropout: float = 0.01):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, minimum=32)
        self.embedding_dim = check_int("embedding_dim", embedding_dim)
        num_learners = check_int("num_learners", num_learners)
        if num_learners > self.embedding_dim:
            raise InvalidArgumentError("num_learners", f"at most embedding_dim={self.embedding_dim}", num_learners)
        c = self.in_channels
        self.attention_map = nn.Sequential(
            nn.Conv2d(c, c // 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c // 8, c // 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c // 32, 1, 3, padding=1), nn.Sigmoid())
        self.dropout = nn.Dropout(check_float("dropout", dropout, low=0.0, high=1.0))
        self.embedding = nn.Linear(c, self.embedding_dim)
        self.register_buffer("learner_of", torch.arange(self.embedding_dim) * num_learners // self.embedding_dim)

    @property
    def num_learners(self) -> int:
        return int(self.learner_of.max()) + 1

    def forward(self, features: torch.Tensor, *, return_attention: bool = False):
        """features (B, C, H, W) -> embeddings (B, embedding_dim), each learner's slice of unit norm."""
        if not isinstance(features, torch.Tensor) or features.dim() != 4 or features.shape[1] != self.in_channels:
            got = f"shape {tuple(features.shape)}" if isinstance(features, torch.Tensor) else type(features).__name__
            raise InvalidArgumentError("features", f"a tensor (B, {self.in_channels}, H, W)", got)
        attention = self.attention_map(features)
        pooled = self.dropout((features * attention).mean(dim=(2, 3)))
        embeddings = self.normalize_learners(self.embedding(pooled))
        return (embeddings, attention) if return_attention else embeddings

    def normalize_learners(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, embedding_dim) -> x with every learner's neurons scaled to unit L2 norm."""
        sq = torch.zeros_like(x, dtype=torch.float32).index_add_(1, self.learner_of, x.float() ** 2)
        return (x.float() * sq.index_select(1, self.learner_of).clamp_min(1e-24).rsqrt()).to(x.dtype)

    @staticmethod
    def taylor_scores(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Per-neuron importance in [0, 1] from embeddings (S, D) and their loss gradients (S, D): |mean(a * g)|, min-max scaled."""
        if activations.dim() != 2 or activations.shape != gradients.shape:
            raise InvalidArgumentError("gradients", f"shape {tuple(activations.shape)} (one per activation, (S, D))",
                                       f"shape {tuple(gradients.shape)}")
        score = (activations * gradients).mean(dim=0).abs()
        return (score - score.min()) / (score.max() - score.min()).clamp_min(1e-12)

    @torch.no_grad()
    def grow(self, scores: torch.Tensor, *, threshold: float = 0.5) -> int:
        """Add a learner from the growing learner's neurons scoring above ``threshold`` (scores (embedding_dim,));
        returns the new number of learners."""
        if scores.shape != (self.embedding_dim,):
            raise InvalidArgumentError("scores", f"shape ({self.embedding_dim},) (one per embedding neuron)",
                                       f"shape {tuple(scores.shape)}")
        threshold = check_float("threshold", threshold, low=0.0, high=1.0)
        last = self.num_learners - 1
        pool = (self.learner_of == last).nonzero().flatten()  # the growing learner's neurons, ascending
        chosen = pool[scores[pool].argsort(descending=True)][: int((scores[pool] > threshold).sum())]
        if not 0 < len(chosen) < len(pool):
            raise InvalidArgumentError("scores", f"between 1 and {len(pool) - 1} of the growing learner's {len(pool)} "
                                       f"neurons above threshold={threshold}", f"{len(chosen)}")
        new, rest = pool[: len(chosen)], pool[len(chosen):]
        weight, bias = self.embedding.weight, self.embedding.bias
        weight[new], bias[new] = weight[chosen].clone(), bias[chosen].clone()
        fresh = nn.Linear(self.in_channels, len(rest)).to(weight.device, weight.dtype)
        nn.init.xavier_normal_(fresh.weight)
        weight[rest], bias[rest] = fresh.weight, fresh.bias
        self.learner_of[rest] = last + 1
        return last + 2
