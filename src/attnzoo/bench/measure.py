"""Timing, peak memory and the FLOP model of one attention call.

Time: the first call is timed on its own (setup: pattern methods build their block structure, compiled
backends compile), then ``repeats`` calls are timed one by one with the device synchronised around each;
the median is reported. Memory: bytes allocated by the call above what was allocated before it (the
inputs). On CUDA that is ``torch.cuda.max_memory_allocated``; on CPU, which has no allocator counter, the
call runs once under ``torch.profiler`` with ``profile_memory=True`` and the peak of the running sum of its
allocation and free events is taken (every tensor allocation goes through the profiled allocator).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..method import sync

MEMORY_METHOD = {
    "cpu": "peak of the running sum of allocation/free events recorded by torch.profiler (profile_memory=True) "
           "during one extra call, above the memory the inputs already hold",
    "cuda": "torch.cuda.max_memory_allocated during one extra call minus the memory allocated before it",
}

FLOP_MODEL = (
    "forward FLOPs = 2 * B * Hq * (D + Dv) * A * density, where A is the number of entries of one head's score matrix "
    "(Nq * Nk, or the causal triangle's count when causal: about half) and density is the fraction of it the method "
    "computed (CallStats.density); this is 4 * B * H * Nq * Nk * D for dense non-causal attention with Dv = D. "
    "Forward+backward counts 3.5x the forward (the backward pass does 2.5x the forward's matrix products)."
)

BACKWARD_FLOP_FACTOR = 3.5


@dataclass
class Timing:
    """Milliseconds: the first (setup) call and each timed repeat after it."""

    setup_ms: float
    times_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def measure_time(fn: Callable[[], object], device: torch.device, *, repeats: int, max_seconds: float = math.inf,
                 min_repeats: int = 3, setup: Callable[[], object] | None = None) -> Timing:
    """Time the first call (``setup``, by default ``fn`` itself) on its own, then ``fn`` up to ``repeats``
    times; stop early (after ``min_repeats``, or after one repeat when the setup call alone took
    ``max_seconds``) once the timed repeats passed ``max_seconds`` in total."""
    setup_ms = _timed(setup or fn, device)
    if setup_ms / 1e3 >= max_seconds:
        min_repeats = 1
    times: list[float] = []
    while len(times) < repeats:
        times.append(_timed(fn, device))
        if len(times) >= min(min_repeats, repeats) and sum(times) / 1e3 >= max_seconds:
            break
    return Timing(setup_ms, times)


def _cpu_peak_from_profile(prof) -> int:
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation and ev.extra_fields.device.type == "cpu":
            events.append((ev.start_time_ns, ev.extra_fields.alloc_size))
        stack.extend(ev.children)
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated when it started (see module doc)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    if device.type != "cpu":
        raise NotImplementedError(f"peak memory on {device.type} is not measured (cpu and cuda are)")
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # some torch builds print a line on every profiler start and stop
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    return _cpu_peak_from_profile(prof)


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 to /dev/null for the duration (C++ prints bypass sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def score_entries(len_q: int, len_kv: int, causal: bool) -> int:
    """Entries of one head's score matrix that exact attention computes (bottom-right causal)."""
    if not causal:
        return len_q * len_kv
    off = len_kv - len_q  # row i sees the keys j <= i + off
    if off >= 0:
        return len_q * off + len_q * (len_q + 1) // 2
    return len_kv * (len_kv + 1) // 2


def attention_flops(*, batch: int, heads: int, len_q: int, len_kv: int, dim: int, dim_v: int, causal: bool,
                    density: float = 1.0, backward: bool = False) -> float:
    """FLOPs of one call under :data:`FLOP_MODEL`."""
    forward = 2.0 * batch * heads * (dim + dim_v) * score_entries(len_q, len_kv, causal) * density
    return forward * (BACKWARD_FLOP_FACTOR if backward else 1.0)
