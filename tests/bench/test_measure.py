"""The measurement primitives: peak memory reports what a function allocates, the FLOP model, timing."""

import time

import torch

from attnzoo.bench.measure import attention_flops, measure_time, peak_memory, score_entries
from attnzoo.kernels.dense import causal_mask

MiB = 2**20


def test_cpu_peak_memory_reports_known_allocations():
    def allocate():
        a = torch.ones(8 * MiB, dtype=torch.uint8)  # 8 MiB
        b = torch.ones(2 * MiB, dtype=torch.float32)  # 8 MiB, both alive: peak 16 MiB
        del a
        c = torch.ones(4 * MiB, dtype=torch.uint8)  # 4 MiB after freeing a: 12 MiB, below the peak
        return b, c

    peak = peak_memory(allocate, torch.device("cpu"))
    assert 16 * MiB <= peak <= 16 * MiB + 64 * 1024, peak


def test_cpu_peak_memory_excludes_what_was_allocated_before():
    held = torch.ones(32 * MiB, dtype=torch.uint8)
    peak = peak_memory(lambda: held + 1, torch.device("cpu"))
    assert 32 * MiB <= peak <= 32 * MiB + 64 * 1024, peak  # the result, not the input


def test_peak_memory_of_a_fused_op_counts_its_workspace():
    """A uint8 sum accumulates in int64: the op's hidden 8x copy is counted, though freed inside the op."""
    x = torch.ones(MiB, dtype=torch.uint8)
    assert peak_memory(lambda: x.sum(), torch.device("cpu")) >= 8 * MiB


def test_score_entries_matches_the_causal_mask():
    for nq, nk in ((7, 7), (3, 9), (9, 4), (1, 5)):
        assert score_entries(nq, nk, True) == int(causal_mask(nq, nk).sum())
        assert score_entries(nq, nk, False) == nq * nk


def test_flop_model():
    assert attention_flops(batch=2, heads=3, len_q=64, len_kv=64, dim=16, dim_v=16, causal=False) == 4 * 2 * 3 * 64 * 64 * 16
    causal = attention_flops(batch=1, heads=1, len_q=64, len_kv=64, dim=16, dim_v=16, causal=True)
    assert causal == 2 * 32 * 64 * 65 / 2 * 1  # 2 (D + Dv) * N (N + 1) / 2
    half = attention_flops(batch=1, heads=1, len_q=64, len_kv=64, dim=16, dim_v=16, causal=False, density=0.25, backward=True)
    assert half == 4 * 64 * 64 * 16 * 0.25 * 3.5


def test_measure_time_separates_setup_and_stops_on_budget():
    calls = []
    timing = measure_time(lambda: calls.append(1), torch.device("cpu"), repeats=7, setup=lambda: calls.append(0))
    assert calls == [0] + [1] * 7 and len(timing.times_ms) == 7 and timing.setup_ms >= 0
    slow = measure_time(lambda: time.sleep(0.005), torch.device("cpu"), repeats=50, max_seconds=0.001, setup=lambda: None)
    assert len(slow.times_ms) == 3  # the minimum, then the budget (1 ms) stops it
    assert slow.min_ms <= slow.median_ms
    once = measure_time(lambda: time.sleep(0.02), torch.device("cpu"), repeats=50, max_seconds=0.01)
    assert len(once.times_ms) == 1 and once.setup_ms >= 20  # a call over budget is timed once after setup
