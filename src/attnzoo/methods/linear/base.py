"""The base of the linear family: normalised linear attention phi(Q) phi(K)^T V on the shared
linear executors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import check_float, check_int
from ...kernels.dense import repeat_kv
from ...kernels.linear import (
    BACKENDS,
    linear_attention,
    linear_executor,
    naive_linear_attention,
)
from ...kernels.linear.feature_maps import fixed_map
from ...method import Call, Method, dense_area


@dataclass
class LinearConfig:
    """``chunk``: tokens per chunk of the causal executor (quadratic inside a chunk); ``eps``: added
    to the normaliser of normalised forms."""

    chunk: int = 64
    eps: float = 1e-6

    def __post_init__(self):
        self.chunk = check_int("chunk", self.chunk)
        self.eps = check_float("eps", self.eps, low=0.0, high=1.0)


class LinearMethod(Method):
    """A linear attention described by a feature map (``features``), an optional per-head decay
    (``decay``), whether rows are normalised (``normalize``) and a post-processing step
    (``finish``). The fast path runs the shared executor (:mod:`attnzoo.kernels.linear`). The
    default reference is its quadratic twin on the same description (a test of the executor only);
    the methods with a formula from their paper override it with the literal N x N weights of
    :mod:`attnzoo.methods.linear.naive`."""

    backends = BACKENDS
    normalize = True

    def features(self, q: torch.Tensor, k: torch.Tensor, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract

    def decay(self, call: Call) -> torch.Tensor | None:
        return None

    def finish(self, out: torch.Tensor, q, k, v, call: Call) -> torch.Tensor:
        return out

    def _forward(self, q, k, v, call: Call):
        qf, kf = self.features(q, k, call)
        v = repeat_kv(v, kf.shape[1] // v.shape[1])  # feature maps may expand GQA keys
        out = linear_attention(qf, kf, v, causal=call.causal, decay=self.decay(call), normalize=self.normalize,
                               eps=self.config.eps, chunk=self.config.chunk, backend=self.backend)
        out = self.finish(out, q, k, v, call).to(q.dtype)
        if not call.timed:
            return out
        ran = linear_executor(qf, kf, v, causal=call.causal, backend=self.backend)
        every_pair = dense_area(call) * call.batch * call.heads_q  # linear forms weight every (query, key) pair
        return out, self.call_stats(call, {"allowed": every_pair, "computed": every_pair, "executor": ran.name, "backend": ran.backend})

    def _reference(self, q, k, v, call: Call):
        qf, kf = self.features(q, k, call)
        v = repeat_kv(v, kf.shape[1] // v.shape[1])
        out = naive_linear_attention(qf, kf, v, causal=call.causal, decay=self.decay(call), normalize=self.normalize,
                                     eps=self.config.eps)
        return self.finish(out, q, k, v, call).to(q.dtype)


@dataclass
class KernelizedConfig(LinearConfig):
    """``feature_map``: a name from :data:`attnzoo.kernels.linear.feature_maps.FIXED_MAPS`
    (``elu`` = elu + 1, ``relu``, ``squared_relu``, ``softmax``, ``silu``, ``identity``)."""

    feature_map: str = "elu"

    def __post_init__(self):
        super().__post_init__()
        fixed_map(self.feature_map)
