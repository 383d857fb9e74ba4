"""benchmarks/cache_table.py's rows (Setting, VARIANTS) on a tiny random-init llama: a row's prefill
and decode through the script's helpers give the tokens of doing it by hand with attnzoo.compress /
attnzoo.patch; the report prints the variants' rows; a resumed run measures and searches only what
its results file lacks."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import attnzoo

transformers = pytest.importorskip("transformers")
from cache.test_compress import VOCAB, tiny_llama

from attnzoo.eval.generation import continuation_nll, greedy, prefill
from attnzoo.integrations.transformers.compress import cache_bytes
from attnzoo.integrations.transformers.echo import ECHO_FORMAT
from attnzoo.integrations.transformers.plan import PATTERNS_FORMAT

N, NEW, TAIL = 96, 4, 34
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cache_table.py"
ACT = {"method": "act", "config": {"threshold": 0.1, "beta": 0.4}}
ACT_SEARCHED = {"act": {"threshold": 0.1, "beta": 0.4, "gains": {"0": [2.5, 0.0, 0.4, 1.5], "1": [0.9, 0.0, 0.0, 0.0]}}}
ECHO = {"format": ECHO_FORMAT, "share": {"1": 0}}


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("cache_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def by_hand(model, ids, enter) -> list[int]:
    """The plain way: the prompt prefilled inside ``enter()``, then NEW + 1 greedy tokens inside it."""
    with enter():
        return greedy(model, prefill(model, ids), NEW + 1)


# name: (the row the script builds, the same context written by hand, what it changes from dense: the cache's
# bytes or the prefill's logits; act's on a random model maybe nothing); act's row: the heads whose gain exceeds 1 nat
ROWS = {
    "snapkv": (lambda t, m: t.policy_settings(m, "snapkv", [0.5]), lambda m: attnzoo.compress(m, "snapkv", ratio=0.5), "bytes"),
    "h2o": (lambda t, m: t.policy_settings(m, "h2o", [0.25]), lambda m: attnzoo.compress(m, "h2o", ratio=0.25), "bytes"),
    "diffqkv-k1": (lambda t, m: t.variant_settings(m, "diffqkv-k1", [0.5], {}), lambda m: attnzoo.compress(m, "diffqkv", k_heads=1),
                   "bytes"),
    "moa-uniform": (lambda t, m: t.variant_settings(m, "moa-uniform", [0.25], {}),
                    lambda m: attnzoo.compress(m, "moa_cache", alpha=0, beta=0.25, sinks=64), "bytes"),
    "act": (lambda t, m: t.variant_settings(m, "act", [0.5], {"act": ACT_SEARCHED}),
            lambda m: attnzoo.patch(m, "act", config={"format": PATTERNS_FORMAT, "layers": {"0": [ACT, {"method": "dense"},
                                                                                                   {"method": "dense"}, ACT]}}), None),
    "echo4": (lambda t, m: t.variant_settings(m, "echo4", [0.5], {"echo4": ECHO}), lambda m: attnzoo.patch(m, "echo", config=ECHO),
              "logits"),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_a_rows_prefill_and_decode_give_the_tokens_of_doing_it_by_hand(rng, table, llama, name):
    settings, enter, changes = ROWS[name]
    (setting,) = settings(table, llama)
    ids = torch.randint(0, VOCAB, (1, N), generator=rng)
    dense = prefill(llama, ids)
    prefix = prefill(llama, ids[:, :-TAIL]) if setting.policy in table.SHARED_PREFIX else None
    ((started, start),) = table.starts(llama, [setting], ids, prefix)
    assert started is setting
    if changes == "bytes":
        assert cache_bytes(start.cache) < cache_bytes(dense.cache)
    elif changes == "logits":
        assert not torch.allclose(start.logits, dense.logits)
    _, tokens = table.interleaved_decode(llama, {"dense": (table.DENSE, dense), setting.row: (setting, start)}, NEW)
    assert tokens[setting.row] == by_hand(llama, ids, lambda: enter(llama))
    assert tokens["dense"] == by_hand(llama, ids, contextlib.nullcontext)


def test_every_decode_step_runs_inside_its_setting(rng, table, llama):
    entered = []

    @contextlib.contextmanager
    def counted():
        entered.append(True)
        with attnzoo.compress(llama, "diffqkv", k_heads=1):
            yield

    setting = table.Setting("counted", counted)
    ((_, start),) = table.starts(llama, [setting], torch.randint(0, VOCAB, (1, N), generator=rng), None)
    ms, _ = table.interleaved_decode(llama, {"counted": (setting, start)}, NEW)
    assert len(entered) == 1 + NEW and ms["counted"] > 0  # the prefill, then each step


def results_file(path: Path, results: dict) -> Path:
    args = {"passkey_contexts": [7168], "trials": 2, "continuation": 512, "ppl_context": 4096, "ratios": [0.25]}
    path.write_text(json.dumps({"args": args, "runs": [], "results": results}))
    return path


def cost(kv: int, prefill_s: float, decode_ms: float) -> dict:
    return {"cache_bytes": kv, "prefill_s": prefill_s, "decode_ms": decode_ms, "dense_decode_ms": 200.0}


def test_the_report_prints_the_variants_rows_in_the_same_table(tmp_path, table):
    mb = 2**20
    passkey = {f"passkey|7168|{t}|{row}": {"correct": row != "act" or t == 0} for t in range(2) for row in ("dense", "act")}
    results = {"cost|dense": {"cache_bytes": 300 * mb, "prefill_s": 90.0}, "ppl|dense": {"perplexity": 14.76},
               "cost|snapkv|0.25": cost(75 * mb, 90.0, 150.0), "ppl|snapkv|0.25": {"perplexity": 15.41},
               "cost|act": cost(300 * mb, 99.0, 210.0), "ppl|act": {"perplexity": 14.5}, "config|act": {"config": ACT_SEARCHED},
               "cost|diffqkv-k2": cost(200 * mb, 45.0, 220.0), "ppl|moa-searched|0.25": {"perplexity": 15.11},
               "config|moa-searched|0.25": {"config": {}}, "passkey|4096|0|echo4": {"correct": True}, **passkey}
    lines = table.report(results_file(tmp_path / "results.json", results)).splitlines()
    assert lines[0].count("passkey 7168") == 1 and lines[0].index("passkey 7168") < lines[0].index("passkey 4096")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| dense", "| `snapkv` 0.25", "| `diffqkv` k_heads=2",
                                                           "| `moa_cache` searched 0.25", "| `act` (2 heads)", "| `echo`"]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    assert rows["`act` (2 heads)"] == ["300.0", "1x", "99.0 (1.10)", "210.0 (1.05; dense 200.0)", "1/2", "-", "14.50 |"]
    assert rows["`diffqkv` k_heads=2"][:4] == ["200.0", "1.50x smaller", "45.0 (0.50)", "220.0 (1.10; dense 200.0)"]
    assert rows["`moa_cache` searched 0.25"] == ["-", "-", "-", "-", "-", "-", "15.11 |"]
    assert rows["`echo`"][4:6] == ["-", "1/1"]
    assert rows["dense"][4:] == ["2/2", "-", "14.76 |"]


class Recorder:
    """A Results whose puts are listed (``put_keys``)."""

    def __init__(self, table, path):
        self.results = table.Results(str(path), {"args": {}, "run": {}})
        self.put_keys = []
        put = self.results.put
        self.results.put = lambda key, value: (self.put_keys.append(key), put(key, value))


def test_a_resumed_run_measures_and_searches_only_what_is_missing(tmp_path, monkeypatch, rng, table, llama):
    ids = torch.randint(0, VOCAB, (1, N + 16), generator=rng)
    monkeypatch.setattr(table, "english_ids", lambda tokenizer, tokens: ids[:, :tokens])
    args = type("Args", (), {"ppl_context": N, "continuation": 16, "tail": TAIL})
    kept = {"nll": 1.0, "perplexity": 2.7}
    path = results_file(tmp_path / "results.json", {"ppl|h2o|0.5": kept})
    groups = {"h2o": table.policy_settings(llama, "h2o", [0.5, 0.25]), "diffqkv-k1": table.variant_settings(llama, "diffqkv-k1", [], {})}
    first = Recorder(table, path)
    table.ppl_section(llama, None, args, first.results, groups)
    assert first.put_keys == ["ppl|dense", "ppl|h2o|0.25", "ppl|diffqkv-k1"]
    saved = json.loads(path.read_text())["results"]
    assert saved["ppl|h2o|0.5"] == kept  # never rewritten
    context, continuation = ids[:, :N], ids[:, N:]
    for row, enter in [("dense", contextlib.nullcontext), ("h2o|0.25", lambda: attnzoo.compress(llama, "h2o", ratio=0.25)),
                       ("diffqkv-k1", lambda: attnzoo.compress(llama, "diffqkv", k_heads=1))]:
        with enter():
            nll = continuation_nll(llama, prefill(llama, context), continuation)
        assert saved[f"ppl|{row}"]["nll"] == pytest.approx(nll, rel=1e-4), row  # dense: its prefix and tail in two calls
        assert saved[f"ppl|{row}"]["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run measured a row its results file holds")

    monkeypatch.setattr(table, "prefill", refuse)
    monkeypatch.setattr(table, "keep_all", refuse)
    again = Recorder(table, path)
    table.ppl_section(llama, None, args, again.results, groups)
    passkey = type("Args", (), {"trials": 1, "passkey_contexts": [N]})
    for trial_row in ("dense", "h2o|0.5", "h2o|0.25", "diffqkv-k1"):
        again.results.put(f"passkey|{N}|0|{trial_row}", kept)
    table.passkey_section(llama, None, passkey, again.results, groups)  # no tokenizer needed: nothing to do
    assert again.put_keys == [f"passkey|{N}|0|{row}" for row in ("dense", "h2o|0.5", "h2o|0.25", "diffqkv-k1")]


def test_a_variants_search_runs_once_and_its_kept_config_is_reused(tmp_path, monkeypatch, table):
    searches = []

    def search(model, ids, ratio):
        searches.append((ratio, ids.shape[1]))
        return {"format": ECHO_FORMAT, "share": {1: 0}, "density": ratio}

    monkeypatch.setitem(table.VARIANTS, "fake", table.Variant(None, lambda config, ratio: "fake", search, per_ratio=True))
    monkeypatch.setattr(table, "calibration_ids", lambda tokenizer, tokens: torch.zeros(1, tokens, dtype=torch.long))
    path = tmp_path / "results.json"
    tokens = {"--calibration-tokens": 32}
    first = table.searched_configs(None, None, ["fake", "diffqkv-k1"], [0.5, 0.25], tokens, table.Results(str(path), {"args": {}, "run": {}}))
    assert searches == [(0.5, 32), (0.25, 32)]
    assert first == {f"fake|{r}": {"format": ECHO_FORMAT, "share": {"1": 0}, "density": r} for r in (0.5, 0.25)}  # as JSON reads it
    assert json.loads(path.read_text())["results"]["config|fake|0.5"]["calibration_tokens"] == 32
    again = table.searched_configs(None, None, ["fake"], [0.5, 0.25], {"--calibration-tokens": 64},
                                   table.Results(str(path), {"args": {}, "run": {}}))
    assert again == first and len(searches) == 2
