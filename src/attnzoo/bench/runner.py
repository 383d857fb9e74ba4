"""The sweep: every method spec x length x pattern (CAB's four: causal or not, self or cross) x pass,
measured against dense in the same run, each measurement committed to the store as soon as it is taken."""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..errors import AttnzooError, InvalidArgumentError, check_int
from ..method import Method
from ..progress import Progress
from ..registry import get_method, method_class
from .machine import machine_info
from .measure import attention_flops, measure_time, peak_memory
from .patterns import NONCAUSAL_SELF, Pattern, pattern_named, self_pattern
from .specs import MethodSpec, config_at, default_specs
from .store import Store

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODES = ("auto", "causal", "non-causal", "both")
CPU_LENGTHS = (1024, 4096, 16384)
CUDA_LENGTHS = (1024, 4096, 16384, 32768, 65536, 131072)


@dataclass
class BenchOptions:
    """What to sweep. ``patterns``: names of CAB's patterns (:mod:`attnzoo.bench.patterns`) every method
    runs (an unsupported one is recorded as skipped). Without them, ``mode`` chooses self-attention
    patterns: ``auto`` runs each method non-causal where it can and causal otherwise (dense in every
    mode another method needs); ``causal``/``non-causal``/``both`` force it."""

    methods: list[MethodSpec] = field(default_factory=default_specs)
    lengths: tuple[int, ...] = CPU_LENGTHS
    batch: int = 1
    heads: int = 8
    heads_kv: int | None = None
    dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    mode: str = "auto"
    patterns: tuple[str, ...] | None = None
    backward: bool = False
    repeats: int = 5
    max_seconds: float = 10.0
    max_call_seconds: float = 10.0
    memory: bool = True
    dense_max_len: int | None = None
    seed: int = 0

    def __post_init__(self):
        self.lengths = tuple(check_int("lengths", n) for n in self.lengths)
        for name in ("batch", "heads", "dim", "repeats"):
            setattr(self, name, check_int(name, getattr(self, name)))
        self.heads_kv = self.heads if self.heads_kv is None else check_int("heads_kv", self.heads_kv)
        if self.heads % self.heads_kv:
            raise InvalidArgumentError("heads_kv", f"a divisor of heads ({self.heads})", self.heads_kv)
        if self.dtype not in DTYPES:
            raise InvalidArgumentError("dtype", f"one of {sorted(DTYPES)}", repr(self.dtype))
        if self.mode not in MODES:
            raise InvalidArgumentError("mode", f"one of {MODES}", repr(self.mode))
        if self.patterns is not None:
            self.patterns = tuple(pattern_named(n).name for n in self.patterns)
            if not self.patterns or self.mode != "auto":
                raise InvalidArgumentError("patterns", "at least one pattern, and mode left at 'auto'",
                                           f"patterns {self.patterns}, mode {self.mode!r}")
        if self.dense_max_len is not None:
            self.dense_max_len = check_int("dense_max_len", self.dense_max_len)
        if not any(s.name == "dense" for s in self.methods):
            self.methods = [MethodSpec("dense"), *self.methods]
        torch.device(self.device)  # raises on a malformed device string

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = [s.key for s in self.methods]
        return d

    def patterns_of(self, spec: MethodSpec) -> list[Pattern]:
        """The patterns ``spec`` runs (an unsupported forced one is still listed: it is recorded as skipped)."""
        if self.patterns is not None:
            return [pattern_named(n) for n in self.patterns]
        if self.mode != "auto":
            return [self_pattern(c) for c in {"causal": [True], "non-causal": [False], "both": [False, True]}[self.mode]]
        if spec.name == "dense":
            needed = {self._auto_causal(s) for s in self.methods if s.name != "dense"}
            return [self_pattern(c) for c in sorted(needed)] or [NONCAUSAL_SELF]
        return [self_pattern(self._auto_causal(spec))]

    @staticmethod
    def _auto_causal(spec: MethodSpec) -> bool:
        return not method_class(spec.name).info.non_causal


@dataclass
class RunOutcome:
    run_id: str
    status: str  # complete | interrupted
    measured: int


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return "out of memory" in text or "not enough memory" in text or "can't allocate memory" in text


def _inputs(opts: BenchOptions, length: int, device: torch.device):
    gen = torch.Generator().manual_seed(opts.seed + length)
    shapes = [(opts.batch, opts.heads, length, opts.dim)] + [(opts.batch, opts.heads_kv, length, opts.dim)] * 2
    return [torch.randn(*s, generator=gen).to(device=device, dtype=DTYPES[opts.dtype]) for s in shapes]


def _describe(row: dict[str, Any]) -> str:
    head = f"N={row['length']:>6} {row['pattern']:<15} {row['pass']:<16} {row['spec']:<28}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row.get('message') or ''}"[:200]
    mem = f"  peak {row['peak_bytes'] / 2**20:8.1f} MiB" if row.get("peak_bytes") is not None else ""
    return f"{head} {row['median_ms']:10.2f} ms  density {row['density']:.3f}{mem}"


def run_bench(opts: BenchOptions, store: Store, *, progress: bool = True,
              after_each: Callable[[dict[str, Any]], None] | None = None) -> RunOutcome:
    """Run the sweep, writing every measurement to ``store``; Ctrl-C ends it early with status
    ``interrupted`` (everything measured so far is kept)."""
    device = torch.device(opts.device)
    run_id = store.start_run(opts.as_dict(), machine_info(device))
    items = [(n, spec, pattern, p) for n in opts.lengths for spec in opts.methods for pattern in opts.patterns_of(spec)
             for p in (("forward", "forward+backward") if opts.backward else ("forward",))]
    bar = Progress(len(items), enabled=progress, unit="meas")
    bar.write(f"attnzoo bench: run {run_id}, {len(items)} measurements, store {store.path}")
    sweep = _Sweep(opts, store, run_id, device)
    measured = 0
    try:
        for length, spec, pattern, pass_ in items:
            row = sweep.measure(length, spec, pattern, pass_)
            measured += 1
            bar.write(_describe(row))
            bar.step(f"N={length} {spec.name}")
            if after_each is not None:
                after_each(row)
    except KeyboardInterrupt:
        store.finish_run(run_id, "interrupted")
        bar.close()
        return RunOutcome(run_id, "interrupted", measured)
    except BaseException:
        store.finish_run(run_id, "failed")
        bar.close()
        raise
    store.finish_run(run_id, "complete")
    bar.close()
    return RunOutcome(run_id, "complete", measured)


class _Sweep:
    """State across one run: the inputs of the current length, the methods built for it, the methods
    that ran out of memory (their longer lengths are skipped) and each forward call's statistics."""

    def __init__(self, opts: BenchOptions, store: Store, run_id: str, device: torch.device):
        self.opts, self.store, self.run_id, self.device = opts, store, run_id, device
        self.length = None
        self.qkv: list[torch.Tensor] = []
        self.methods: dict[tuple[MethodSpec, Pattern], Method | Exception] = {}
        self.stopped: dict[tuple[MethodSpec, Pattern, str], str] = {}  # why longer lengths are skipped
        self.last_call: dict[tuple[MethodSpec, Pattern, str], tuple[int, float]] = {}  # (length, seconds per call)
        self.stats: dict[tuple[MethodSpec, Pattern], Any] = {}

    def _set_length(self, length: int) -> None:
        if length != self.length:
            self.qkv, self.methods, self.stats = [], {}, {}
            _release(self.device)
            self.qkv = _inputs(self.opts, length, self.device)
            self.length = length

    def _method(self, spec: MethodSpec, length: int, pattern: Pattern) -> Method | Exception:
        if (spec, pattern) not in self.methods:
            try:
                self.methods[(spec, pattern)] = get_method(spec.name, **config_at(spec, length, pattern))
            except (AttnzooError, TypeError) as exc:
                self.methods[(spec, pattern)] = exc
        return self.methods[(spec, pattern)]

    def measure(self, length: int, spec: MethodSpec, pattern: Pattern, pass_: str) -> dict[str, Any]:
        opts = self.opts
        info = method_class(spec.name).info
        try:
            config = config_at(spec, length, pattern)
        except AttnzooError:
            config = spec.config
        row: dict[str, Any] = dict(
            method=spec.name, spec=spec.key, family="/".join(info.family), config=config, pattern=pattern.name,
            causal=pattern.causal, pass_=pass_, batch=opts.batch, heads_q=opts.heads, heads_kv=opts.heads_kv,
            length_q=pattern.query_length(length), length=length, dim=opts.dim, dtype=opts.dtype, device=str(self.device))
        row.update(self._outcome(length, spec, pattern, pass_, info))
        row["pass"] = row.pop("pass_")
        self.store.add_result(self.run_id, **row)
        return row

    def _predicted_too_slow(self, length: int, spec: MethodSpec, pattern: Pattern, pass_: str) -> str | None:
        """Why to skip this length when the last one, grown quadratically (the worst case of the
        methods here), would exceed --max-call-seconds; None to run it."""
        last = self.last_call.get((spec, pattern, pass_))
        if last is None or length <= last[0]:
            return None
        predicted = last[1] * (length / last[0]) ** 2
        if predicted <= self.opts.max_call_seconds:
            return None
        return (f"predicted too slow: {last[1]:.2f} s per call at N={last[0]} grows to ~{predicted:.0f} s at N={length} "
                f"if quadratic (--max-call-seconds {self.opts.max_call_seconds:g})")

    def _outcome(self, length: int, spec: MethodSpec, pattern: Pattern, pass_: str, info) -> dict[str, Any]:
        opts = self.opts
        unsupported = pattern.unsupported_reason(info)
        if unsupported is not None:
            return {"status": "skipped", "message": unsupported}
        if spec.name == "dense" and opts.dense_max_len is not None and length > opts.dense_max_len:
            return {"status": "skipped", "message": f"dense capped at --dense-max-len {opts.dense_max_len}"}
        stopped = self.stopped.get((spec, pattern, pass_)) or self._predicted_too_slow(length, spec, pattern, pass_)
        if stopped is not None:
            return {"status": "skipped", "message": stopped}
        backward = pass_ == "forward+backward"
        if backward and (spec, pattern) in self.stats and isinstance(self.stats[(spec, pattern)], BaseException):
            return {"status": "skipped", "message": "the forward pass failed"}
        try:
            self._set_length(length)
            method = self._method(spec, length, pattern)
            if isinstance(method, Exception):
                return {"status": "skipped", "message": f"cannot configure: {method}"}
            outcome = self._timed_call(method, spec, pattern, backward)
            self.last_call[(spec, pattern, pass_)] = (length, outcome["median_ms"] / 1e3)
            if outcome["median_ms"] / 1e3 > opts.max_call_seconds:
                self.stopped[(spec, pattern, pass_)] = (f"too slow: {outcome['median_ms'] / 1e3:.1f} s per call at N={length} "
                                                       f"(--max-call-seconds {opts.max_call_seconds:g})")
            return outcome
        except AttnzooError as exc:
            self.stats[(spec, pattern)] = exc
            return {"status": "skipped", "message": str(exc)}
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - a failing method is recorded and the sweep goes on
            self.stats.setdefault((spec, pattern), exc)
            if is_out_of_memory(exc):
                self.stopped[(spec, pattern, pass_)] = f"out of memory at N={length}"
                _release(self.device)
                return {"status": "oom", "message": f"{type(exc).__name__}: {str(exc)[:500]}"}
            return {"status": "error", "message": f"{type(exc).__name__}: {str(exc)[:2000]}"}

    def _timed_call(self, method: Method, spec: MethodSpec, pattern: Pattern, backward: bool) -> dict[str, Any]:
        opts = self.opts
        q, k, v = self.qkv
        len_q = pattern.query_length(k.shape[2])
        if len_q != q.shape[2]:  # cross-attention: the last queries, as a chunk of a prefill over a cache
            q = q[:, :, -len_q:].contiguous()
        if backward:
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            grad = torch.randn(q.shape[:3] + v.shape[3:], device=q.device, dtype=q.dtype)

            def call():
                for t in (q, k, v):
                    t.grad = None
                method(q, k, v, causal=pattern.causal).backward(grad)

            timing = measure_time(call, self.device, repeats=opts.repeats, max_seconds=opts.max_seconds)
            stats = self.stats.get((spec, pattern))
            if stats is None:
                with torch.no_grad():
                    stats = method(q, k, v, causal=pattern.causal, return_stats=True)[1]
        else:
            holder = {}

            def first():
                with torch.no_grad():
                    holder["stats"] = method(q, k, v, causal=pattern.causal, return_stats=True)[1]

            def call():
                with torch.no_grad():
                    method(q, k, v, causal=pattern.causal)

            timing = measure_time(call, self.device, repeats=opts.repeats, max_seconds=opts.max_seconds, setup=first)
            stats = self.stats[(spec, pattern)] = holder["stats"]
        peak = peak_memory(call, self.device) if opts.memory else None
        flops = attention_flops(batch=opts.batch, heads=opts.heads, len_q=q.shape[2], len_kv=k.shape[2], dim=opts.dim,
                                dim_v=v.shape[3], causal=pattern.causal, density=stats.density, backward=backward)
        return dict(status="ok", message=None, backend=stats.backend, setup_ms=timing.setup_ms,
                    median_ms=timing.median_ms, min_ms=timing.min_ms, times_ms=timing.times_ms,
                    repeats=len(timing.times_ms), peak_bytes=peak, density=stats.density, flops=flops,
                    tflops=flops / (timing.median_ms * 1e-3) / 1e12)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
