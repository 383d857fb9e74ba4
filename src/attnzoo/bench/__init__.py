"""``attnzoo bench``: speed, peak memory and quality of attention methods against dense, stored in
SQLite and reported as one HTML file. See :func:`run_bench` and the ``attnzoo bench`` command."""

from .measure import (
    FLOP_MODEL,
    MEMORY_METHOD,
    attention_flops,
    measure_time,
    peak_memory,
)
from .patterns import PATTERNS, Pattern, parse_patterns
from .report import render, write_report
from .runner import BenchOptions, RunOutcome, run_bench
from .specs import MethodSpec, parse_method_spec
from .store import Store

__all__ = [
    "FLOP_MODEL", "MEMORY_METHOD", "PATTERNS", "BenchOptions", "MethodSpec", "Pattern", "RunOutcome", "Store",
    "attention_flops", "measure_time", "parse_method_spec", "parse_patterns", "peak_memory", "render", "run_bench",
    "write_report",
]
