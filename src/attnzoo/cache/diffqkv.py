"""Sigma's DiffQKV as a training-free cache layout: fewer K heads than V heads, and selective V loading."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError, check_int
from ..registry import ComponentInfo
from . import register
from .base import CachePolicy, CacheView


@dataclass
class DiffQKVConfig:
    """``k_heads``: K heads cached per layer (at most the model's KV heads; KV head h reads K head
    h * k_heads // Hkv); ``v_top``: at calls over a held cache, each query reads the values of its
    ``v_top`` highest-scored keys only (None: all)."""

    k_heads: int = 1
    v_top: int | None = None

    def __post_init__(self):
        self.k_heads = check_int("k_heads", self.k_heads)
        self.v_top = None if self.v_top is None else check_int("v_top", self.v_top)


def key_groups(kv_heads: int, k_heads: int) -> list[int]:
    """The K head each of ``kv_heads`` KV heads reads: contiguous groups, h * k_heads // kv_heads."""
    if k_heads > kv_heads:
        raise InvalidArgumentError("k_heads", f"at most the layer's {kv_heads} KV heads", k_heads)
    return [h * k_heads // kv_heads for h in range(kv_heads)]


def merge_keys(keys: torch.Tensor, k_heads: int) -> torch.Tensor:
    """(B, k_heads, N, D): the mean of each group of ``keys`` (B, Hkv, N, D) heads (:func:`key_groups`)."""
    groups = torch.tensor(key_groups(keys.shape[1], k_heads), device=keys.device)
    merged = keys.new_zeros(keys.shape[0], k_heads, *keys.shape[2:]).index_add_(1, groups, keys)
    return merged / torch.bincount(groups, minlength=k_heads).to(keys.dtype)[:, None, None]


@register
class DiffQKV(CachePolicy):
    """DiffQKV ("Sigma: Differential Rescaling of Query, Key and Value for Efficient Language
    Models", arXiv 2501.13629), training-free.

    The paper trains a model whose attention has fewer K heads than V heads (K compressed harder
    than V, which the model is more sensitive to) and, optionally, fetches V only for the keys
    with the highest attention scores at inference. A pretrained GQA model has as many K as V
    heads, so here the K heads are obtained from the model's own: each group of KV heads
    (:func:`key_groups`) caches the mean of its post-RoPE keys (the mean-pooling by which GQA
    checkpoints are made from multi-head ones; RoPE is linear and shared, so this is the mean of
    the K projections), while every V head is kept. Each query head scores its group's merged K;
    with ``v_top`` a query's softmax runs over its ``v_top`` best logits and reads only their V
    rows (renormalised over them). Every token is kept: the memory saved is the K heads'.
    ``augmented Q`` (the paper's larger query heads) needs training and is not applied."""

    info = ComponentInfo(name="diffqkv", title="Sigma: Differential Rescaling of Query, Key and Value for Efficient Language Models",
                         arxiv="2501.13629", family=("decode",), summary="fewer K heads (merged) than V heads, selective V loading")
    Config = DiffQKVConfig
    sets_budget = True

    def score(self, view: CacheView) -> torch.Tensor:
        return torch.full(view.positions.shape, float("inf"), device=view.positions.device)  # every token stays
