"""The sweep: rows for every method x length, dense in the same run, failures recorded and survived."""

import pytest
import torch

from attnzoo.bench.runner import BenchOptions, run_bench
from attnzoo.bench.specs import MethodSpec, config_at, near_square_grid, parse_method_spec
from attnzoo.bench.store import Store
from attnzoo.registry import get_method
from attnzoo.errors import InvalidArgumentError, UnknownNameError


def _specs(*texts):
    return [parse_method_spec(t) for t in texts]


def _run(tmp_path, **kw):
    opts = BenchOptions(**{"lengths": (64, 256), "heads": 2, "dim": 16, "repeats": 2, **kw})
    store = Store(tmp_path / "s.sqlite")
    outcome = run_bench(opts, store, progress=False)
    return store, outcome, store.results(outcome.run_id)


def test_tiny_sweep_measures_every_method_against_dense(tmp_path):
    store, outcome, rows = _run(tmp_path, methods=_specs("sliding_window:window=16", "neighborhood:kernel_size=3"),
                                backward=True)
    assert outcome.status == "complete" and store.run(outcome.run_id)["status"] == "complete"
    got = {(r["method"], r["length"], r["pass"], r["causal"]) for r in rows}
    for n in (64, 256):
        for p in ("forward", "forward+backward"):
            # auto mode: both run non-causal, so dense runs non-causal only
            assert {("dense", n, p, 0), ("sliding_window", n, p, 0), ("neighborhood", n, p, 0)} <= got
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows), [r["message"] for r in rows]
    nb = [r for r in rows if r["method"] == "neighborhood" and r["length"] == 256][0]
    assert nb["config"]["grid"] == [16, 16] and nb["config"]["kernel_size"] == 3
    sw = [r for r in rows if r["method"] == "sliding_window" and r["length"] == 256 and r["pass"] == "forward"][0]
    assert 0 < sw["density"] < 0.1 and sw["repeats"] == 2 and len(sw["times_ms"]) == 2
    assert sw["median_ms"] > 0 and sw["setup_ms"] > 0 and sw["peak_bytes"] > 0 and sw["tflops"] > 0
    assert sw["flops"] == pytest.approx(4 * 2 * 256 * 256 * 16 * sw["density"])


def test_failing_method_does_not_stop_the_run(tmp_path, test_methods):
    store, outcome, rows = _run(tmp_path, methods=_specs("bench_test_broken", "bench_test_hungry", "sliding_window"),
                                lengths=(64, 128, 256))
    assert outcome.status == "complete"
    by = {(r["method"], r["length"]): r for r in rows}
    for n in (64, 128, 256):
        assert by[("bench_test_broken", n)]["status"] == "error"
        assert "deliberate failure" in by[("bench_test_broken", n)]["message"]
        assert by[("sliding_window", n)]["status"] == "ok" and by[("dense", n)]["status"] == "ok"
    assert by[("bench_test_hungry", 64)]["status"] == "ok"
    assert by[("bench_test_hungry", 128)]["status"] == "oom"
    assert by[("bench_test_hungry", 256)]["status"] == "skipped"
    assert "out of memory at N=128" in by[("bench_test_hungry", 256)]["message"]


def test_refused_shapes_and_modes_are_skipped_with_reasons(tmp_path):
    _, _, rows = _run(tmp_path, methods=_specs("hilo", "neighborhood:grid=(8,8)", "streaming"), mode="both",
                      dense_max_len=64, max_call_seconds=1e9)  # no time-based skips on a loaded machine
    by = {(r["method"], r["length"], r["causal"]): r for r in rows}
    assert by[("hilo", 64, 1)]["status"] == "skipped" and "non-causal only" in by[("hilo", 64, 1)]["message"]
    assert by[("streaming", 64, 0)]["status"] == "skipped" and "causal only" in by[("streaming", 64, 0)]["message"]
    assert by[("neighborhood", 64, 0)]["status"] == "ok"
    assert by[("neighborhood", 256, 0)]["status"] == "skipped" and "grid" in by[("neighborhood", 256, 0)]["message"]
    assert by[("dense", 256, 0)]["status"] == "skipped" and "--dense-max-len" in by[("dense", 256, 0)]["message"]
    assert by[("hilo", 256, 0)]["status"] == "ok"


def test_method_specs():
    spec = parse_method_spec("neighborhood:kernel_size=13,dilation=(1,2),grid=128x128")
    assert spec == MethodSpec("neighborhood", {"kernel_size": 13, "dilation": (1, 2), "grid": (128, 128)})
    assert spec.key == "neighborhood:dilation=(1,2),grid=(128,128),kernel_size=13"
    assert config_at(parse_method_spec("neighborhood:grid=1d"), 100)["grid"] == (100,)
    assert config_at(MethodSpec("maxvit_block"), 4096) == {"block_size": 8, "grid": (64, 64)}
    assert config_at(MethodSpec("hip"), 4096) == {}  # the budget rule is its own default
    assert config_at(parse_method_spec("sliding_window:window=9"), 4096) == {"window": 9}
    assert near_square_grid(2048) == (32, 64) and near_square_grid(1000) == (25, 40) and near_square_grid(4096, 3) == (16, 16, 16)
    with pytest.raises(UnknownNameError, match="did you mean 'sliding_window'"):
        parse_method_spec("sliding_windw")
    with pytest.raises(InvalidArgumentError, match="--method"):
        parse_method_spec("sliding_window:512")
    with pytest.raises(InvalidArgumentError, match="mode"):
        BenchOptions(mode="sideways")
    with pytest.raises(InvalidArgumentError, match="heads_kv"):
        BenchOptions(heads=8, heads_kv=3)


def test_too_slow_methods_skip_longer_lengths(tmp_path):
    _, _, rows = _run(tmp_path, methods=_specs("sliding_window:window=16"), lengths=(64, 128), max_call_seconds=1e-9)
    by = {(r["method"], r["length"]): r for r in rows}
    assert by[("sliding_window", 64)]["status"] == "ok" and by[("dense", 64)]["status"] == "ok"
    assert by[("sliding_window", 128)]["status"] == "skipped" and "too slow" in by[("sliding_window", 128)]["message"]


def test_lengths_predicted_too_slow_are_skipped():
    """A length whose call, grown quadratically from the last one, would exceed the budget is skipped
    before it runs (a 2 s call at 1K predicts 32 s at 4K)."""
    from attnzoo.bench.runner import _Sweep

    sweep = _Sweep(BenchOptions(max_call_seconds=10.0), None, "run", torch.device("cpu"))
    spec = MethodSpec("random_feature")
    sweep.last_call[(spec, False, "forward")] = (1024, 2.0)
    assert "predicted too slow" in sweep._predicted_too_slow(4096, spec, False, "forward")
    assert sweep._predicted_too_slow(2048, spec, False, "forward") is None  # ~8 s
    assert sweep._predicted_too_slow(4096, spec, True, "forward") is None  # nothing measured causal yet


def test_methods_with_one_budget_number_run_at_the_rules_density():
    """sliding_window, streaming and neighborhood get the window / kernel whose density is the budget
    rule's target (0.15 at 4K keys, 0.15 * 4096 / N beyond), measured by the methods themselves: within
    5% for the windows (a centred window loses up to window / 4 keys per row at the two ends: 3.7%),
    25% for the kernel (the largest odd side whose square fits: 23^2 = 529 of 614 keys)."""
    from attnzoo.bench.patterns import CAUSAL_SELF, NONCAUSAL_SELF
    from attnzoo.methods.dynamic.budget import density_for

    n = 4096
    q = k = v = torch.randn(1, 1, n, 8)
    for text, pattern, tolerance in (("sliding_window", NONCAUSAL_SELF, 0.05), ("sliding_window", CAUSAL_SELF, 0.05),
                                     ("streaming", CAUSAL_SELF, 0.05), ("neighborhood", NONCAUSAL_SELF, 0.25)):
        spec = parse_method_spec(text)
        method = get_method(spec.name, **config_at(spec, n, pattern))
        _, stats = method(q, k, v, causal=pattern.causal, return_stats=True)
        assert abs(stats.density / density_for(n) - 1) < tolerance, (text, pattern.name, stats.density)
    assert config_at(MethodSpec("sliding_window"), 16384, CAUSAL_SELF)["window"] == round(density_for(16384) * (16384 + 1) / 2)
