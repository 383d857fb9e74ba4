"""Distillation recipes: which method trains, on which teacher signal, with which loss.

A recipe's name is the registered method it trains (``attnzoo.patch(model, NAME, weights=DIR)`` loads
the result). Losses come from two places: per layer, from the teacher's own q, k, v (the attention
map or output the method must reproduce: every layer trains on the frozen model's inputs, LoLCATs'
"attention transfer"); and, for recipes with ``student_pass``, from a forward pass of the model with
the learned methods in place (block outputs, the model's output).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import UnknownNameError, UnsupportedError
from ..kernels.dense import attention_probabilities, causal_mask, repeat_kv, sdpa
from ..method import Method
from ..methods.learned.fit import mimicry_loss
from ..methods.learned.seer import block_max_target
from .targets import QKV, Signals, Target


def kl_to_target(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) over the last axis, averaged over rows; entries where the target
    is zero add nothing (so -inf logits there are fine). target, logits (..., K)."""
    log_p = torch.log_softmax(logits, dim=-1)
    terms = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - log_p), torch.zeros_like(target))
    return terms.sum(-1).mean()


class Recipe:
    """Base: ``method`` (the registered method trained), ``defaults`` (its config unless given), ``lr``."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    lr: ClassVar[float] = 1e-3
    student_pass: ClassVar[bool] = False

    @property
    def method(self) -> str:
        return self.name

    def check(self, target: Target, layers: list[int]) -> None:
        """Raise for a model this recipe cannot train on."""

    unit: ClassVar[str] = "method"  # what trains per layer: the method's state, or ("attention") a copy of the layer
    # True: layer_losses read only what teacher_features keeps of the frozen teacher, so the harness may run the
    # teacher once per training example and keep that (see distill's cache_teacher)
    caches_teacher: ClassVar[bool] = False

    def configure(self, target: Target, config: Mapping[str, Any]) -> dict[str, Any]:
        """The method's config: ``config`` over the recipe's defaults."""
        return {**self.defaults, **config}

    def layer_losses(self, unit, teacher: Signals, layer: int) -> dict[str, torch.Tensor]:
        """Named losses of one layer's ``unit`` from the teacher's signals (its q, k, v, ...)."""
        return {}

    def model_losses(self, teacher: Signals, student: Signals) -> dict[str, torch.Tensor]:
        """Named losses from a student forward pass (only with ``student_pass``)."""
        return {}


class SeerRecipe(Recipe):
    """``seer``: the AttnGate's block distribution is trained by KL to the block-max-pooled attention map
    (``target="sum"``: the block-sum-pooled one)."""

    name = "seer"
    defaults = {"block_size": 64, "top_k": 8}
    lr = 1e-3

    caches_teacher = True

    def teacher_features(self, method, teacher, layer) -> dict:
        """The gate's pooled inputs and the pooled target map of one layer (a few block x block maps per head)."""
        qkv = teacher.qkv[layer]
        target = block_max_target(qkv.q, qkv.k, causal=qkv.causal, scale=qkv.scale, block=method.config.block_size,
                                  pool=method.config.target)
        return {**method.gate_inputs(qkv.q, qkv.k, causal=qkv.causal, scale=qkv.scale), "target": target}

    def feature_losses(self, method, features: dict) -> dict[str, torch.Tensor]:
        return {"gate_kl": kl_to_target(features["target"], method.gate_logits_from(features))}

    def layer_losses(self, method, teacher, layer):
        return self.feature_losses(method, self.teacher_features(method, teacher, layer))


class SparsifinerRecipe(Recipe):
    """``sparsifiner``: the connectivity predictor's row distribution is trained by KL to the exact attention map."""

    name = "sparsifiner"
    defaults = {"density": 0.25, "rank": 8}
    lr = 3e-3

    def check(self, target, layers):
        causal = [i for i in layers if target.causal[i]]
        if causal:
            raise UnsupportedError(f"recipe 'sparsifiner' distils non-causal (vision) attention; layers {causal} are causal")

    def layer_losses(self, method, teacher, layer):
        qkv = teacher.qkv[layer]
        target = attention_probabilities(qkv.q, qkv.k, scale=qkv.scale)
        return {"connectivity_kl": kl_to_target(target, method.connectivity(qkv.q, qkv.k, scale=qkv.scale))}


def relative_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``out`` against ``target``, relative to the target's mean square."""
    return F.mse_loss(out, target) / target.pow(2).mean().clamp_min(1e-12)


def block_output_loss(teacher: Signals, student: Signals) -> torch.Tensor:
    """:func:`relative_mse` of each distilled block's output in the student pass, averaged over blocks."""
    return torch.stack([relative_mse(student.hidden[i], teacher.hidden[i]) for i in student.hidden]).mean()


def output_mse(method: Method, qkv: QKV) -> torch.Tensor:
    """Mean squared error of ``method``'s attention output against exact attention, relative to the exact output's mean square."""
    exact = sdpa(qkv.q, qkv.k, qkv.v, causal=qkv.causal, scale=qkv.scale)
    out = method(qkv.q, qkv.k, qkv.v, causal=qkv.causal, scale=qkv.scale, check_finite=False)
    return relative_mse(out, exact)


class FeatureMapRecipe(Recipe):
    """Learned linear-attention feature maps (``hedgehog``, ``linfusion``): Hedgehog's attention-weight
    cross-entropy plus the attention-output error, per layer; with ``block_loss`` also the relative error
    of each block's output in a student pass (LinFusion's and CLEAR's block-output loss)."""

    lr = 1e-2
    block_loss: ClassVar[bool] = False

    def layer_losses(self, method, teacher, layer):
        qkv = teacher.qkv[layer]
        mask = causal_mask(qkv.q.shape[2], qkv.k.shape[2], qkv.q.device) if qkv.causal else None
        k = repeat_kv(qkv.k, qkv.q.shape[1] // qkv.k.shape[1])
        return {"attention_ce": mimicry_loss(method.feature_map, qkv.q.float(), k.float(), mask, qkv.scale),
                "output_mse": output_mse(method, qkv)}

    @property
    def student_pass(self) -> bool:  # type: ignore[override]
        return self.block_loss

    def model_losses(self, teacher, student):
        return {"block_mse": block_output_loss(teacher, student)}


class HedgehogRecipe(FeatureMapRecipe):
    """``hedgehog``; with ``window`` (the LoLCATs hybrid) the cross-entropy is on the hybrid's own
    attention weights (window softmax and linear map under one normalisation, :meth:`Hedgehog.hybrid_weights`)."""

    name = "hedgehog"

    def layer_losses(self, method, teacher, layer):
        if not method.config.window:
            return super().layer_losses(method, teacher, layer)
        qkv = teacher.qkv[layer]
        mask = causal_mask(qkv.q.shape[2], qkv.k.shape[2], qkv.q.device)
        target = attention_probabilities(qkv.q.float(), qkv.k.float(), scale=qkv.scale, mask=mask)
        student = method.hybrid_weights(qkv.q.float(), qkv.k.float(), scale=qkv.scale)
        return {"attention_ce": -(target * torch.log(student.clamp_min(1e-12))).sum(-1).mean(), "output_mse": output_mse(method, qkv)}


class LinFusionRecipe(FeatureMapRecipe):
    name = "linfusion"
    block_loss = True

    def check(self, target, layers):
        causal = [i for i in layers if target.causal[i]]
        if causal:
            raise UnsupportedError(f"recipe 'linfusion' distils non-causal attention; layers {causal} are causal")


class ClearRecipe(Recipe):
    """``clear`` (CLEAR, arXiv 2412.16112): each chosen layer of an ``attnzoo.nn`` model is replaced by a
    copy of itself running the circular local window, and the copy's projections train on the
    attention-output loss (the copy fed the teacher's layer input) plus the block-output loss of a
    student pass. ``grid`` defaults to the model's ``grid``."""

    name = "clear"
    unit = "attention"
    defaults = {"radius": 4.0}
    lr = 5e-4
    student_pass = True

    def check(self, target, layers):
        if target.kind != "attnzoo.nn":
            raise UnsupportedError("recipe 'clear' trains copies of attnzoo.nn.Attention layers; this model is a transformers model")

    def configure(self, target, config):
        grid = getattr(target, "grid", None)
        return {**self.defaults, **({"grid": tuple(grid)} if grid is not None else {}), **config}

    def layer_losses(self, attention, teacher, layer):
        return {"attention_mse": relative_mse(attention(teacher.inputs[layer]), teacher.outputs[layer])}

    def model_losses(self, teacher, student):
        return {"block_mse": block_output_loss(teacher, student)}


class MoHRecipe(Recipe):
    """``moh``: the head routers train on the model's output: KL from the frozen model's output
    distribution (logits of a language model; softmax over the last axis) to the routed model's."""

    name = "moh"
    defaults = {"active": 0.75, "shared": 0}
    lr = 3e-4  # on SmolLM2-135M: 1e-2 diverged (output KL 1.4 -> 7 in 4 steps); 1e-3 rose again by 150 steps (held-out KL 1.07)
    student_pass = True

    def model_losses(self, teacher, student):
        target = torch.softmax(teacher.output.float(), dim=-1)
        return {"output_kl": kl_to_target(target, student.output.float())}


RECIPES: dict[str, type[Recipe]] = {cls.name: cls for cls in (SeerRecipe, HedgehogRecipe, LinFusionRecipe, ClearRecipe, SparsifinerRecipe, MoHRecipe)}


def get_recipe(name: str | Recipe) -> Recipe:
    """The recipe registered as ``name`` (or ``name`` itself, a Recipe)."""
    if isinstance(name, Recipe):
        return name
    if name not in RECIPES:
        raise UnknownNameError("distillation recipe", str(name), RECIPES)
    return RECIPES[name]()

