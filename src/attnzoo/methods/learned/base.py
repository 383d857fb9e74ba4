"""The base of methods with a learned feature map (Hedgehog, LinFusion): the map is a submodule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...errors import InvalidArgumentError, check_int
from ...kernels.dense import repeat_kv, work_dtype
from ...method import Call
from ..linear.base import LinearConfig, LinearMethod
from .fit import fit_to_softmax


class LearnedFeatureMethod(LinearMethod):
    """Normalised linear attention whose feature map is an ``nn.Module`` ``(q, k) -> (phi(q),
    phi(k))`` with one parameter set per query head. The map is the submodule ``feature_map``
    (given at construction, created by ``materialize`` or trained by ``fit``); while it is None an
    untrained map is made per input shape and not kept in the state."""

    map_type: ClassVar[type[nn.Module]] = nn.Module

    def __init__(self, *, feature_map: nn.Module | None = None, **config):
        super().__init__(**config)
        if feature_map is not None and not isinstance(feature_map, self.map_type):
            raise InvalidArgumentError("feature_map", f"None or a {self.map_type.__name__}", type(feature_map).__name__)
        self.feature_map = feature_map
        self._untrained: dict = {}

    def new_map(self, heads: int, dim: int) -> nn.Module:
        raise NotImplementedError  # pragma: no cover - abstract

    def materialize(self, heads_q: int, heads_kv: int, dim: int, dim_v: int) -> None:
        if self.feature_map is None:
            self.feature_map = self.new_map(heads_q, dim)

    def feature_module(self, call: Call) -> nn.Module:
        """The learned map, or an untrained one for these shapes (cached outside the state)."""
        if self.feature_map is not None:
            return self.feature_map
        key = (call.heads_q, call.dim, call.device)
        if key not in self._untrained:
            self._untrained[key] = self.new_map(call.heads_q, call.dim).to(call.device)
        return self._untrained[key]

    def features(self, q, k, call: Call):
        work = work_dtype(q)
        fmap = self.feature_module(call)
        return fmap(q.to(work), repeat_kv(k, call.groups).to(work))

    def fit(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, scale: float | None = None,
            steps: int = 200, lr: float = 1e-2, window: int = 256, windows_per_step: int = 4) -> list[float]:
        """Fit the feature map on sample queries/keys of one layer, q (B, Hq, N, D), k (B, Hkv, N, D),
        to the teacher ``softmax(q k^T * scale)`` (Hedgehog's cross-entropy distillation, on windows
        of ``window`` tokens, see :func:`~attnzoo.methods.learned.fit.fit_to_softmax`); the fitted
        map becomes the submodule ``feature_map`` (the config is not touched). Returns the loss per step."""
        if q.dim() != 4 or k.dim() != 4 or q.shape[1] % k.shape[1]:
            raise InvalidArgumentError("q, k", "(B, Hq, N, D) and (B, Hkv, N, D) with Hq a multiple of Hkv", f"{tuple(q.shape)}, {tuple(k.shape)}")
        fmap = self.feature_map if self.feature_map is not None else self.new_map(q.shape[1], q.shape[-1]).to(q.device)
        losses = fit_to_softmax(fmap, q, repeat_kv(k, q.shape[1] // k.shape[1]), causal=causal, scale=scale, steps=steps,
                                lr=lr, window=window, windows_per_step=windows_per_step)
        self.feature_map = fmap
        return losses


@dataclass
class LearnedMapConfig(LinearConfig):
    """``width``: the width of a new map (default: the head dim)."""

    width: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.width is not None:
            self.width = check_int("width", self.width)


class LearnedPart:
    """Mixin of methods whose learned part is one submodule (Seer's gate, Sparsifiner's predictor), named
    ``part_name``: ``materialize`` creates it for the layer's shapes (``new_part(heads_q, dim)``); while it
    is None, an untrained one is made per input shape and kept outside the state (:meth:`part`)."""

    part_name: ClassVar[str]

    def new_part(self, heads: int, dim: int) -> nn.Module:
        raise NotImplementedError  # pragma: no cover - abstract

    def materialize(self, heads_q: int, heads_kv: int, dim: int, dim_v: int) -> None:
        if getattr(self, self.part_name) is None:
            setattr(self, self.part_name, self.new_part(heads_q, dim))

    def part(self, call: Call) -> nn.Module:
        """The learned part, or an untrained one for these shapes."""
        learned = getattr(self, self.part_name)
        if learned is not None:
            return learned
        untrained = self.__dict__.setdefault("_untrained_parts", {})
        key = (call.heads_q, call.dim, call.device)
        if key not in untrained:
            untrained[key] = self.new_part(call.heads_q, call.dim).to(call.device)
        return untrained[key]
