"""The method contract: a configured, callable attention with a dense reference and an info card.

Every registered method subclasses :class:`Method`, declares a dataclass ``Config`` and a
:class:`MethodInfo`, and implements ``_forward`` (the fast path) and ``_reference`` (a plain dense
computation that follows the paper's equations). Input checks, GQA bookkeeping and call statistics
live here once.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .errors import InvalidArgumentError, UnknownNameError, UnsupportedError
from .kernels.dense import work_dtype

FAMILIES = ("exact", "local", "dynamic", "linear", "learned", "decode", "head", "module", "analysis", "multimodal")


@dataclass(frozen=True)
class MethodInfo:
    """What a user needs to know before choosing a method."""

    name: str
    title: str
    arxiv: str | None
    family: tuple[str, ...]
    causal: bool
    non_causal: bool
    cross: bool
    gqa: bool
    training_free: bool
    time: str
    memory: str
    spatial: bool = False
    summary: str = ""

    def __post_init__(self):
        unknown = [f for f in self.family if f not in FAMILIES]
        if unknown:
            raise InvalidArgumentError("MethodInfo.family", f"names from {FAMILIES}", unknown)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Call:
    """The shapes and flags of one attention call, checked once and handed to the method."""

    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_kv: int
    dim: int
    dim_v: int
    causal: bool
    scale: float
    device: torch.device
    dtype: torch.dtype
    timed: bool = False  # stats were asked for: time the phases (synchronising the device around each)

    @property
    def groups(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.heads_q // self.heads_kv

    @property
    def self_attention(self) -> bool:
        return self.len_q == self.len_kv


@dataclass
class CallStats:
    """Statistics of one call, returned with ``return_stats=True``.

    ``density`` is the fraction of the (causal, where causal) score matrix the fast path computed;
    ``backend`` is the backend asked for, resolved (``torch``, ``flex``, ``triton``, ``naive``);
    ``executor`` the kernel that actually ran (e.g. ``strip``, ``blocks``, ``gather``, ``chunked``,
    ``sdpa``); times are wall-clock milliseconds (synchronised on GPU).
    """

    method: str
    backend: str
    density: float
    selection_ms: float = 0.0
    attention_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    executor: str = ""


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return f"{type(t).__name__}"


def check_finite_tensor(name: str, t: torch.Tensor) -> None:
    """Raise if ``t`` holds NaN or inf. One reduction (a sum is finite iff every entry is, barring
    overflow); the exact count runs only when that sum is not finite."""
    if bool(torch.isfinite(t.sum(dtype=work_dtype(t)))):
        return
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    if n_nan or n_inf:
        raise InvalidArgumentError(name, "finite values", f"{n_nan} NaN and {n_inf} infinite entries")


def check_qkv(q: object, k: object, v: object, *, causal: object, scale: object, check_finite: bool = True) -> Call:
    """Check the SDPA layout q (B,Hq,Nq,D), k (B,Hkv,Nk,D), v (B,Hkv,Nk,Dv) and return the :class:`Call`."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(name, "a torch.Tensor", _describe(t))
        if t.dim() != 4:
            raise InvalidArgumentError(name, "a 4-D tensor (batch, heads, tokens, head_dim)", f"shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise InvalidArgumentError(name, "dtype float32, float16, bfloat16 or float64", t.dtype)
    if not (q.dtype == k.dtype == v.dtype):
        raise InvalidArgumentError("k, v", f"the dtype of q ({q.dtype})", f"k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InvalidArgumentError("k, v", f"the device of q ({q.device})", f"k on {k.device}, v on {v.device}")
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise InvalidArgumentError("k, v", f"batch size {B} (from q)", f"k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise InvalidArgumentError("v", f"{k.shape[1]} heads (from k)", v.shape[1])
    if k.shape[2] != v.shape[2]:
        raise InvalidArgumentError("v", f"{k.shape[2]} tokens (from k)", v.shape[2])
    if k.shape[3] != D:
        raise InvalidArgumentError("k", f"head_dim {D} (from q)", k.shape[3])
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if min(B, Hq, Nq, D, Hkv, Nk, Dv) == 0:
        raise InvalidArgumentError("q, k, v", "non-empty tensors", f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hq % Hkv:
        raise InvalidArgumentError("q", f"a number of heads that is a multiple of k's {Hkv} (grouped-query attention)", Hq)
    if not isinstance(causal, bool):
        raise InvalidArgumentError("causal", "a bool", repr(causal))
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise InvalidArgumentError("scale", "None or a positive finite number", repr(scale))
    if check_finite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_finite_tensor(name, t)
    return Call(B, Hq, Hkv, Nq, Nk, D, Dv, causal, float(scale), q.device, q.dtype)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU): timers are read only after it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Milliseconds since the last lap of a call's phase, synchronised; a no-op returning 0 unless
    ``call.timed`` (so a call without ``return_stats`` never waits for the device)."""

    def __init__(self, call: Call):
        self.device, self.timed = call.device, call.timed
        if self.timed:
            sync(self.device)
            self.start = time.perf_counter()

    def lap(self) -> float:
        if not self.timed:
            return 0.0
        sync(self.device)
        now = time.perf_counter()
        elapsed, self.start = (now - self.start) * 1e3, now
        return elapsed


def build_config(owner: str, config_class: type, options: dict[str, Any], extra: tuple[str, ...] = ()):
    """``config_class(**options)`` after checking every option name (an unknown one raises
    :class:`UnknownNameError` naming ``owner`` and the known options, ``extra`` included)."""
    names = set(config_class.__dataclass_fields__)  # (dataclasses.fields is opaque to torch.compile)
    for key in options:
        if key not in names:
            raise UnknownNameError(f"option of {owner}", key, names | set(extra))
    return config_class(**options)


class Method(torch.nn.Module):
    """Base class of every attention method: an ``nn.Module`` whose ``forward`` is the attention call.

    Subclasses set ``info`` and ``Config`` (a dataclass of plain values whose ``__post_init__``
    checks them), and implement ``_forward(q, k, v, call)`` and ``_reference(q, k, v, call)``.
    ``check(call)`` rejects patterns the method cannot run. Both paths receive inputs that passed
    :func:`check_qkv`. State a method learns (feature maps, gates, projections) lives in the
    module's parameters and buffers, never in ``config``, so two methods with equal configs are
    interchangeable and ``state_dict`` saves what was learned.
    """

    info: ClassVar[MethodInfo]
    Config: ClassVar[type]
    backends: ClassVar[tuple[str, ...]] = ("auto",)

    def __init__(self, *, backend: str = "auto", **config: Any):
        if backend not in self.backends:
            raise InvalidArgumentError("backend", f"one of {self.backends} for {self.info.name!r}", repr(backend))
        super().__init__()
        self.backend = backend
        self.config = build_config(f"method {self.info.name!r}", self.Config, config, extra=("backend",))

    # ---- public API -------------------------------------------------------------------------
    def forward(self, q, k, v, *, causal: bool = False, scale: float | None = None, return_stats: bool = False,
                check_finite: bool = True):
        """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).

        ``return_stats``: also return a :class:`CallStats` (the device is synchronised around the
        call only then). ``check_finite``: reject NaN / inf inputs (one reduction per tensor and a
        host read; model integrations check once per patch and pass False after; skipped while
        ``torch.compile`` traces).
        """
        call = self._prepare(q, k, v, causal, scale, check_finite=check_finite, timed=return_stats)
        watch = Stopwatch(call)
        result = self._forward(q, k, v, call)
        if not return_stats:
            return result[0] if isinstance(result, tuple) else result
        total_ms = watch.lap()
        out, stats = result if isinstance(result, tuple) else (result, self.stats(call))
        stats.attention_ms = total_ms - stats.selection_ms
        return out, stats

    def forward_with_lse(self, q, k, v, *, causal: bool = False, scale: float | None = None,
                         check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(out (B, Hq, Nq, Dv), lse (B, Hq, Nq)): the output and each row's natural log-sum-exp of
        the scaled logits over the keys the method attends to (-inf where none), so results over
        disjoint key sets merge exactly (:func:`attnzoo.merge_attention`; decode-time caches and
        context parallelism build on it). Methods whose output is a softmax over a subset of keys
        (exact, position patterns, block selections) have it; the others raise UnsupportedError."""
        call = self._prepare(q, k, v, causal, scale, check_finite=check_finite)
        return self._forward_with_lse(q, k, v, call)

    def reference(self, q, k, v, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
        """Dense PyTorch computation of the paper's equations (the oracle the fast path is tested against)."""
        call = self._prepare(q, k, v, causal, scale)
        return self._reference(q, k, v, call)

    def support(self, q, k, v, *, causal: bool = False, scale: float | None = None) -> torch.Tensor | None:
        """The (query, key) pairs this method attends to on these inputs, as a boolean mask that
        broadcasts to (B, Hq, Nq, Nk), for measuring recall of the exact attention mass; None where
        the method has no sparse support (linear or pooled attention). Dense: O(Nq Nk) memory."""
        return self._support(q, k, v, self._prepare(q, k, v, causal, scale))

    def materialize(self, heads_q: int, heads_kv: int, dim: int, dim_v: int) -> None:
        """Create the learned state for inputs of these shapes now, so its parameters exist before an
        optimiser is built (:class:`attnzoo.nn.Attention` calls this); a no-op for stateless methods."""

    def stats(self, call: Call) -> CallStats:
        """Statistics of a call with these shapes, for methods whose ``_forward`` returns no stats of
        its own: every pair computed, by the method's own PyTorch code."""
        return CallStats(self.info.name, "torch" if self.backend == "auto" else self.backend, density=1.0, executor="pytorch")

    def call_stats(self, call: Call, counts: dict[str, Any], *, selection_ms: float = 0.0) -> CallStats:
        """The :class:`CallStats` of a call from an executor's ``counts``: ``allowed`` (query-key
        entries of the method's support; None where the executor did not count them) and ``computed``
        (entries the executor multiplied), ``backend`` and ``executor`` (what ran); other entries go
        to ``extra``. Density is allowed (else computed) entries over the dense (causal) area, summed
        over batch and query heads: the one definition every method reports."""
        area = dense_area(call) * call.batch * call.heads_q
        allowed = counts.get("allowed")
        extra = {key: value for key, value in counts.items() if key not in ("allowed", "computed", "backend", "executor")}
        extra["computed_fraction"] = counts["computed"] / area
        density = min(1.0, (counts["computed"] if allowed is None else allowed) / area)
        return CallStats(self.info.name, counts.get("backend", self.backend), density=density, selection_ms=selection_ms,
                         extra=extra, executor=counts.get("executor", ""))

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"{type(self).__name__}({fields})"

    # ---- hooks ------------------------------------------------------------------------------
    def check(self, call: Call) -> None:
        """Raise :class:`UnsupportedError` or :class:`InvalidArgumentError` for calls this method can't run."""

    def _forward(self, q, k, v, call: Call):  # pragma: no cover - abstract
        raise NotImplementedError

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward_with_lse(self, q, k, v, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        raise UnsupportedError(f"method {self.info.name!r} has no log-sum-exp form (its output is not a softmax over a subset "
                               "of the keys); forward_with_lse runs for dense, position-pattern and block-selection methods")

    def _support(self, q, k, v, call: Call) -> torch.Tensor | None:
        """See :meth:`support`; methods with a sparse support override this."""
        return None

    # ---- shared checks ----------------------------------------------------------------------
    def _prepare(self, q, k, v, causal, scale, check_finite: bool = True, timed: bool = False) -> Call:
        if not isinstance(check_finite, bool):
            raise InvalidArgumentError("check_finite", "a bool", repr(check_finite))
        call = check_qkv(q, k, v, causal=causal, scale=scale, check_finite=check_finite and not torch.compiler.is_compiling())
        if timed:
            call = dataclasses.replace(call, timed=True)
        info = self.info
        if call.causal and not info.causal:
            raise UnsupportedError(f"method {info.name!r} does not support causal=True (it is non-causal only)")
        if not call.causal and not info.non_causal:
            raise UnsupportedError(f"method {info.name!r} does not support causal=False (it is causal only)")
        if not call.self_attention and not info.cross:
            raise UnsupportedError(
                f"method {info.name!r} needs self-attention (q and k of equal length); got Nq={call.len_q}, Nk={call.len_kv}"
            )
        if call.groups > 1 and not info.gqa:
            raise UnsupportedError(f"method {info.name!r} does not support grouped-query attention (Hq={call.heads_q}, Hkv={call.heads_kv})")
        self.check(call)
        return call


def dense_area(call: Call) -> float:
    """Entries of the dense (causal, where causal) score matrix of one head."""
    if not call.causal:
        return float(call.len_q * call.len_kv)
    off = call.len_kv - call.len_q
    rows = torch.arange(call.len_q, dtype=torch.float64) + off + 1
    return float(rows.clamp(min=0, max=call.len_kv).sum())
