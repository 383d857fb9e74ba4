"""KV-cache policies and cache-side variants on SmolLM2-135M in real generation, against the dense cache in the same run.

    python benchmarks/cache_table.py                  # the issue's full table (every registered ratio policy)
    python benchmarks/cache_table.py --policies snapkv,streaming_llm --cost-context 2048 \\
        --passkey-contexts 1024 --trials 2 --ppl-context 1024 --continuation 256    # a quick one
    python benchmarks/cache_table.py --policies "" --variants diffqkv-k2,moa-searched,act   # only rows of VARIANTS
    python benchmarks/cache_table.py --report         # the Markdown table of what --out holds so far

A row of the table is a :class:`Setting`: its name in the result keys and the context its prefill
and each decode step run in. ``--policies`` gives one row per ratio of each ratio policy (inside
``attnzoo.compress(model, name, ratio=r)``); ``--variants`` adds the rows of :data:`VARIANTS`:
policies that set their own budgets (``diffqkv``, ``moa_cache``), ``selective`` with its logit
subtraction (which attends itself, so takes no shortcut) and attention methods run with
the dense cache (``act``, ``echo`` through ``attnzoo.patch``). A variant's search (MoA's spans,
ACT's heads, EchoAtt's layers) runs once, on the first ``--calibration-tokens`` (MoA:
``--moa-calibration-tokens``) of ``distill_seer.calibration_text`` (never the evaluation text), and
its config is kept in the results as ``config|<row>``, so a rerun reuses it.

Every result is written to ``--out`` as it comes, and a rerun skips what the file already holds
(so a rerun with more ``--policies`` or ``--variants`` adds their rows; an entry is never
rewritten). Per row:

- cost at ``--cost-context`` tokens (``cost|<row>``): the prefill's seconds and its peak RSS above
  the start (sampled, in this process: the allocator reuses earlier runs' memory, so it
  understates), the KV bytes held (summed from the cache's tensors) and the decode milliseconds
  per token, dense and the group's steps interleaved (``--new`` each) so all see the same load;
- ``ppl|<row>``: perplexity of a ``--continuation``-token continuation teacher-forced after a
  compressed ``--ppl-context``;
- ``passkey|<context>|<trial>|<row>`` at each of ``--passkey-contexts``, ``--trials`` keys spread
  over the depths.

Rows are ``dense``, ``<policy>|<ratio>`` (e.g. ``snapkv|0.25``), ``<variant>`` (``act``) or
``<variant>|<ratio>`` for the variants with one row per ratio (``moa-searched|0.25``: the ratio
as MoA's density).

One prefill, several budgets: the policies in ``ONE_PREFILL`` score keys without reference to
the budget, so each prompt is prefilled once per policy keeping every key
(:func:`attnzoo.eval.generation.keep_all`) and cut to each ratio (:func:`~attnzoo.eval.generation.cut`);
those in ``SHARED_PREFIX`` read only the latest queries, so they and the dense row share one
dense prefill of all but the prompt's last ``--tail`` tokens. ``tests/cache/test_one_prefill.py``
checks both against separate runs. Every other row (other policies, every variant) gets a
separate prefill. The cost section's prefill is a full one per policy (no shared prefix): its
time is the keep-everything prefill's (the policy's scoring included), plus the cut's, listed apart.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import attnzoo
from attnzoo.cache import list_policies
from attnzoo.cache.moa_search import moa_search
from attnzoo.errors import InvalidArgumentError
from attnzoo.eval.generation import (
    PeakMemory,
    Prefill,
    continuation_nll,
    cut,
    english_ids,
    greedy,
    keep_all,
    prefill,
)
from attnzoo.eval.passkey import answer_is, passkey_plan, passkey_prompt
from attnzoo.integrations.transformers.act import act_search, act_select
from attnzoo.integrations.transformers.compress import cache_argument, cache_bytes
from attnzoo.integrations.transformers.echo import echo_search
from attnzoo.registry import CACHES

SHARED_PREFIX = {"snapkv", "streaming_llm"}  # read only the latest queries (not cumulative)
ONE_PREFILL = SHARED_PREFIX | {"h2o", "selective"}  # every score independent of the budget
ACT_MIN_GAIN = 1.0  # nats: the act row calibrates the heads whose calibration gained more (README "ACT and EchoAtt")


class Results:
    """The JSON file of results, keyed by strings such as ``passkey|7168|3|snapkv|0.25``; saved on every put."""

    def __init__(self, path: str, header: dict):
        self.path = Path(path)
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data = {**header, "runs": old.get("runs", []) + [header["run"]], "results": old.get("results", {})}
        del self.data["run"]

    def has(self, *keys: str) -> bool:
        return all(k in self.data["results"] for k in keys)

    def get(self, key: str):
        return self.data["results"][key]

    def put(self, key: str, value) -> None:
        self.data["results"][key] = value
        self.data["runs"][-1]["load_now"] = os.getloadavg()[0]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=1) + "\n")
        temporary.replace(self.path)


# ---- rows of the table --------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One row of the table: ``row``, its part of the result keys (``snapkv|0.25``, ``act``,
    ``moa-searched|0.25``), and ``enter()``, which opens the context its prefill and each of its
    decode steps run in (a compression, a patch over the dense cache, or both). ``policy`` and
    ``ratio``: a ratio policy's row, whose prefill may take the ``ONE_PREFILL`` shortcuts."""

    row: str
    enter: Callable[[], contextlib.AbstractContextManager]
    policy: str | None = None
    ratio: float | None = None


DENSE = Setting("dense", contextlib.nullcontext)


@dataclass(frozen=True)
class Variant:
    """A kind of row beyond the ratio policies. ``enter(model, config, ratio)``: the context of
    its prefill and decode steps; ``label(config, ratio)``: its Markdown label; ``search(model,
    calibration ids (1, N), ratio)``: the config it needs (None: it needs none; the config is None
    then); ``per_ratio``: one row per ``--ratios`` value, else one row (ratio None);
    ``calibration``: the option giving the calibration tokens its search reads."""

    enter: Callable
    label: Callable[[dict | None, float | None], str]
    search: Callable | None = None
    per_ratio: bool = False
    calibration: str = "--calibration-tokens"


def _diffqkv(**options) -> Variant:
    """``attnzoo.compress(model, "diffqkv", **options)``."""
    label = "`diffqkv` " + ", ".join(f"{k}={v}" for k, v in options.items())
    return Variant(lambda model, config, ratio: attnzoo.compress(model, "diffqkv", **options), lambda config, ratio: label)


def act_heads(config: dict) -> int:
    """How many heads an ``attnzoo-patterns/1`` config runs ``act`` on."""
    return sum(spec["method"] == "act" for specs in config["layers"].values() for spec in specs)


def _act_label(config: dict | None, ratio) -> str:
    return "`act`" if config is None else f"`act` ({act_heads(act_select(config, ACT_MIN_GAIN))} heads)"


def _echo_label(config: dict | None, ratio) -> str:
    if config is None:
        return "`echo`"
    layers = sorted(int(layer) for layer in config["share"])
    return f"`echo` {len(layers)} layers ({', '.join(map(str, layers))})"


VARIANTS = {
    "diffqkv-k2": _diffqkv(k_heads=2),
    "diffqkv-k1": _diffqkv(k_heads=1),
    "diffqkv-k2-vtop256": _diffqkv(k_heads=2, v_top=256),
    "moa-searched": Variant(lambda model, config, ratio: attnzoo.compress(model, "moa_cache", config=config),
                            lambda config, ratio: f"`moa_cache` searched {ratio}",
                            lambda model, ids, ratio: moa_search(model, ids, density=ratio, kv_groups=True), per_ratio=True,
                            calibration="--moa-calibration-tokens"),
    "moa-uniform": Variant(lambda model, config, ratio: attnzoo.compress(model, "moa_cache", alpha=0, beta=ratio, sinks=64),
                           lambda config, ratio: f"`moa_cache` uniform {ratio}", per_ratio=True),
    "act": Variant(lambda model, config, ratio: attnzoo.patch(model, "act", config=act_select(config, ACT_MIN_GAIN)), _act_label,
                   lambda model, ids, ratio: act_search(model, ids)),
    "echo4": Variant(lambda model, config, ratio: attnzoo.patch(model, "echo", config=config), _echo_label,
                     lambda model, ids, ratio: echo_search(model, ids, shared=4)),
    "selective-subtract": Variant(lambda model, config, ratio: attnzoo.compress(model, "selective", ratio=ratio, subtract=True),
                                  lambda config, ratio: f"`selective` {ratio}, subtract=True", per_ratio=True),
    "selective-subtract-all-kept": Variant(lambda model, config, ratio: attnzoo.compress(model, "selective", ratio=1.0, subtract=True),
                                           lambda config, ratio: "`selective` 1.0 (nothing pruned), subtract=True"),
}


def row_of(name: str, ratio: float | None) -> str:
    return name if ratio is None else f"{name}|{ratio}"


def policy_settings(model, name: str, ratios) -> list[Setting]:
    """The rows of ratio policy ``name``, one per ratio."""
    return [Setting(row_of(name, r), functools.partial(attnzoo.compress, model, name, ratio=r), name, r) for r in ratios]


def variant_settings(model, name: str, ratios, configs: dict) -> list[Setting]:
    """The rows of variant ``name`` (one, or one per ratio), with their searched ``configs`` {row: config}."""
    variant = VARIANTS[name]
    rows = [(row_of(name, r), r) for r in (ratios if variant.per_ratio else [None])]
    return [Setting(row, functools.partial(variant.enter, model, configs.get(row), r)) for row, r in rows]


def calibration_ids(tokenizer, tokens: int) -> torch.Tensor:
    """(1, tokens) ids of the searches' calibration text (standard-library docstrings, not the evaluation text)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the seer script sits beside this one
    from distill_seer import calibration_text

    from attnzoo.eval.perplexity import token_ids

    ids = token_ids(tokenizer, calibration_text())
    if len(ids) < tokens:
        raise InvalidArgumentError("calibration tokens", f"at most {len(ids)} (the calibration text's length)", tokens)
    return ids[None, :tokens]


def searched_configs(model, tokenizer, variants, ratios, tokens: dict[str, int], results: Results) -> dict[str, dict]:
    """{row: config} of each search the ``variants`` need, run on the calibration tokens their
    options give (``tokens``: {option: count}) and kept as ``config|<row>`` (a config already kept
    is reused, not searched again)."""
    configs = {}
    for name in variants:
        variant = VARIANTS[name]
        for ratio in (ratios if variant.per_ratio else [None]) if variant.search else []:
            key, wanted = f"config|{row_of(name, ratio)}", tokens[variant.calibration]
            if not results.has(key):
                calibration, began = calibration_ids(tokenizer, wanted), time.perf_counter()
                found = json.loads(json.dumps(variant.search(model, calibration, ratio)))  # as a resumed run reads it
                results.put(key, {"calibration_tokens": wanted, "search_s": time.perf_counter() - began, "config": found})
                print(f"search {key}: {results.get(key)['search_s']:.0f} s", flush=True)
            elif results.get(key)["calibration_tokens"] != wanted:
                print(f"{key}: reusing the kept config, searched on {results.get(key)['calibration_tokens']} calibration tokens "
                      f"(not {variant.calibration} {wanted})", flush=True)
            configs[row_of(name, ratio)] = results.get(key)["config"]
    return configs


def pending(results: Results, groups: dict[str, list[Setting]], key: Callable[[Setting], str]) -> dict[str, list[Setting]]:
    """The settings of each group whose result ``key(setting)`` is not yet in ``results`` (groups with none left out)."""
    missing = {name: [s for s in group if not results.has(key(s))] for name, group in groups.items()}
    return {name: group for name, group in missing.items() if group}


# ---- measuring ----------------------------------------------------------------------------------
def shares_prefix(group: list[Setting]) -> bool:
    """Whether ``group``'s prefills start from the dense prefill of the prompt but its tail."""
    return group[0] is DENSE or group[0].policy in SHARED_PREFIX


def starts(model, group: list[Setting], ids: torch.Tensor, prefix: Prefill | None):
    """(setting, the prefilled cache of ``ids`` in it) for each setting of ``group`` (one policy's
    ratios, one variant's rows, or [DENSE]); decode each inside ``setting.enter()``. ``prefix``: the
    dense prefill of ``ids`` but its tail, for the groups that :func:`shares_prefix`."""
    if group[0] is DENSE:
        yield DENSE, dense_start(model, ids, prefix)
        return
    policy = group[0].policy
    if policy in ONE_PREFILL:
        full = keep_all(model, policy, ids, dense_prefix=prefix if policy in SHARED_PREFIX else None)
        for setting in group:
            yield setting, cut(model, policy, full, setting.ratio)
        return
    for setting in group:
        with setting.enter():
            start = prefill(model, ids)
        yield setting, start


def dense_start(model, ids, prefix):
    """The dense prefill of ``ids`` continued from a copy of ``prefix`` (its first tokens)."""
    return prefill(model, ids[:, prefix.cache.get_seq_length():], copy.deepcopy(prefix.cache))


@torch.no_grad()
def interleaved_decode(model, runs: dict[str, tuple[Setting, Prefill]], steps: int) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Median ms per decode step of each run {label: (setting, prefill)}, one step of each in turn
    (the same load for all), each step inside its setting; and each run's ``steps + 1`` greedy
    tokens (the first from the prefill's logits)."""
    name, times = cache_argument(model), {label: [] for label in runs}
    tokens = {label: [int(start.logits[0, -1].argmax())] for label, (_, start) in runs.items()}
    for _ in range(steps):
        for label, (setting, start) in runs.items():
            token = torch.tensor([tokens[label][-1:]], device=start.logits.device)
            with setting.enter():
                began = time.perf_counter()
                out = model(input_ids=token, **{name: start.cache}, use_cache=True)
                times[label].append(time.perf_counter() - began)
            tokens[label].append(int(out.logits[0, -1].argmax()))
    return {label: 1e3 * statistics.median(t) for label, t in times.items()}, tokens


def timed(function, *args, **kwargs):
    with PeakMemory() as peak:
        began = time.perf_counter()
        out = function(*args, **kwargs)
        seconds = time.perf_counter() - began
    return out, seconds, peak.above


def cost_section(model, tokenizer, args, results: Results, groups: dict[str, list[Setting]]) -> None:
    todo = pending(results, {"dense": [DENSE], **groups}, lambda s: f"cost|{s.row}")
    if not todo:
        return
    ids = english_ids(tokenizer, args.cost_context)
    dense, dense_s, peak = timed(prefill, model, ids)
    if todo.pop("dense", None):
        results.put("cost|dense", {"prefill_s": dense_s, "peak_rss_bytes": peak, "cache_bytes": cache_bytes(dense.cache)})
    for name, group in todo.items():
        rows, runs, policy = {}, {"dense": (DENSE, dense.copy())}, group[0].policy
        if policy in ONE_PREFILL:
            full, seconds, peak = timed(keep_all, model, policy, ids)
            for setting in group:
                start, cut_s, _ = timed(cut, model, policy, full, setting.ratio)
                rows[setting.row] = {"prefill_s": seconds, "cut_s": cut_s, "peak_rss_bytes": peak, "prefill": "keep-all + cut"}
                runs[setting.row] = (setting, start)
            del full
        else:
            for setting in group:
                with setting.enter():
                    start, seconds, peak = timed(prefill, model, ids)
                rows[setting.row] = {"prefill_s": seconds, "peak_rss_bytes": peak, "prefill": "separate"}
                runs[setting.row] = (setting, start)
        for setting in group:
            rows[setting.row]["cache_bytes"] = cache_bytes(runs[setting.row][1].cache)
        ms, _ = interleaved_decode(model, runs, args.new)
        for setting in group:
            results.put(f"cost|{setting.row}", {**rows[setting.row], "decode_ms": ms[setting.row], "dense_decode_ms": ms["dense"],
                                                "steps": args.new, "dense_cache_bytes": cache_bytes(dense.cache), "dense_prefill_s": dense_s})
        print(f"cost {name}: " + ", ".join(f"{s.row}: {ms[s.row]:.1f} ms vs dense {ms['dense']:.1f}" for s in group), flush=True)


def nll_record(nll: float) -> dict:
    return {"nll": nll, "perplexity": float(torch.tensor(nll).exp())}


def ppl_section(model, tokenizer, args, results: Results, groups: dict[str, list[Setting]]) -> None:
    ids = english_ids(tokenizer, args.ppl_context + args.continuation)
    context, continuation = ids[:, :args.ppl_context], ids[:, args.ppl_context:]
    prefix = None
    for name, group in pending(results, {"dense": [DENSE], **groups}, lambda s: f"ppl|{s.row}").items():
        if prefix is None and shares_prefix(group):
            prefix = prefill(model, context[:, :-args.tail])
        for setting, start in starts(model, group, context, prefix):
            with setting.enter():
                results.put(f"ppl|{setting.row}", nll_record(continuation_nll(model, start, continuation)))
        print(f"ppl {name} done", flush=True)


def passkey_section(model, tokenizer, args, results: Results, groups: dict[str, list[Setting]]) -> None:
    depths = [(i + 0.5) / args.trials for i in range(args.trials)]
    for context in args.passkey_contexts:
        for trial, (depth, key) in enumerate(passkey_plan(depths, 1, seed=0)):
            trial_key = f"passkey|{context}|{trial}"
            todo = pending(results, {"dense": [DENSE], **groups}, lambda s, head=trial_key: f"{head}|{s.row}")
            if not todo:
                continue
            ids, position = passkey_prompt(tokenizer, context, depth, key)
            trial_info = {"depth": depth, "key": key, "tokens": ids.shape[1], "key_position": position}
            prefix = None
            for group in todo.values():
                if prefix is None and shares_prefix(group):
                    prefix = prefill(model, ids[:, :-args.tail])
                for setting, start in starts(model, group, ids, prefix):
                    with setting.enter():
                        answer = tokenizer.decode(greedy(model, start, args.answer_tokens, tokenizer.eos_token_id), skip_special_tokens=True)
                    results.put(f"{trial_key}|{setting.row}", {**trial_info, "answer": answer.strip(), "correct": answer_is(answer, key)})
            print(f"passkey {context} trial {trial} done", flush=True)


# ---- the report ---------------------------------------------------------------------------------
def row_in(key: str) -> str:
    """The row a result key belongs to (``passkey|7168|3|snapkv|0.25`` -> ``snapkv|0.25``)."""
    return "|".join(key.split("|")[3 if key.startswith("passkey|") else 1:])


def _order(row: str) -> tuple:
    """Dense first, then the ratio policies by name, then the variants in :data:`VARIANTS`' order; ratios high to low."""
    name, _, ratio = row.partition("|")
    place = (0, "") if name == "dense" else (2, list(VARIANTS).index(name)) if name in VARIANTS else (1, name)
    return (*place, -float(ratio or 0))


def row_label(row: str, results: dict) -> str:
    name, _, ratio = row.partition("|")
    if name == "dense":
        return "dense"
    if name not in VARIANTS:
        return f"`{name}` {ratio}"
    config = results.get(f"config|{row}", {}).get("config")
    return VARIANTS[name].label(config, float(ratio) if ratio else None)


def _versus(kv: int | None, dense: int | None) -> str:
    """How a row's KV bytes compare with dense's: "3.97x smaller", "1.02x larger", "1x" or "-"."""
    if not kv:
        return "-"
    if not dense or kv == dense:
        return "1x"
    return f"{dense / kv:.2f}x smaller" if kv < dense else f"{kv / dense:.2f}x larger"


def report(path: str) -> str:
    """The Markdown table of the results in ``path`` (what has been measured so far)."""
    data = json.loads(Path(path).read_text())
    args, results = data["args"], data["results"]  # args: the latest run's; the columns are those measured in any run
    measured = [k for k in results if not k.startswith("config|")]
    contexts = sorted({int(k.split("|")[1]) for k in measured if k.startswith("passkey|")}, reverse=True)
    rows = sorted({row_in(k) for k in measured} | {"dense"}, key=_order)
    lines = ["| cache | KV MB held | vs dense | prefill s (x dense) | decode ms/token (x dense, interleaved) | "
             + " | ".join(f"passkey {c}" for c in contexts) + f" | ppl {args['continuation']} after {args['ppl_context']} |",
             "|" + "---|" * (6 + len(contexts))]
    dense = results.get("cost|dense", {})
    for row in rows:
        cost, is_dense = results.get(f"cost|{row}", {}), row == "dense"
        kv = cost.get("cache_bytes")
        cells = [row_label(row, results), f"{kv / 2**20:.1f}" if kv else "-", _versus(kv, dense.get("cache_bytes"))]
        if is_dense:
            cells += [f"{dense['prefill_s']:.1f}" if dense else "-", "-"]
        elif cost:
            versus = f" ({cost['prefill_s'] / cost.get('dense_prefill_s', dense['prefill_s']):.2f})"
            cells += [f"{cost['prefill_s']:.1f}{versus}",
                      f"{cost['decode_ms']:.1f} ({cost['decode_ms'] / cost['dense_decode_ms']:.2f}; dense {cost['dense_decode_ms']:.1f})"]
        else:
            cells += ["-", "-"]
        for c in contexts:
            trials = [value for k, value in results.items() if k.startswith(f"passkey|{c}|") and row_in(k) == row]
            cells.append(f"{sum(t['correct'] for t in trials)}/{len(trials)}" if trials else "-")
        ppl = results.get(f"ppl|{row}")
        cells.append(f"{ppl['perplexity']:.2f}" if ppl else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _names(text: str | None, default: list[str]) -> list[str]:
    return default if text is None else [n for n in text.split(",") if n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policies", default=None, help="comma-separated ratio policies (default: every registered cache policy "
                   "that takes a ratio; \"\": none)")
    p.add_argument("--passkey-policies", default=None, help="the policies of the passkey section (default: --policies)")
    p.add_argument("--variants", default="", help=f"comma-separated rows beyond the ratio policies, of: {', '.join(VARIANTS)}")
    p.add_argument("--ratios", default="0.5,0.25,0.125", help="the ratio policies' ratios, and the densities of the moa variants")
    p.add_argument("--calibration-tokens", type=int, default=256, help="tokens of calibration text ACT's and EchoAtt's searches read")
    p.add_argument("--moa-calibration-tokens", type=int, default=2048, help="tokens of calibration text MoA's search reads")
    p.add_argument("--sections", default="cost,ppl,passkey")
    p.add_argument("--cost-context", type=int, default=7168)
    p.add_argument("--new", type=int, default=16, help="decode steps timed per cache in the cost section")
    p.add_argument("--passkey-contexts", default="7168,4096")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--ppl-context", type=int, default=4096)
    p.add_argument("--continuation", type=int, default=512)
    p.add_argument("--tail", type=int, default=64, help="prompt tokens prefilled under the shared-prefix policies")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="attnzoo-results/cache_table.json")
    p.add_argument("--report", action="store_true", help="print the table of --out and stop")
    args = p.parse_args()
    if args.report:
        print(report(args.out))
        return
    known = [info.name for info in list_policies() if not CACHES.get(info.name).sets_budget]
    args.policies = _names(args.policies, known)
    args.passkey_policies = _names(args.passkey_policies, args.policies)
    args.variants = _names(args.variants, [])
    unknown = sorted(set(args.policies + args.passkey_policies) - set(known))
    if unknown:
        p.error(f"--policies: unknown ratio policies {unknown}; registered: {known} (the others are in --variants)")
    strange = sorted(set(args.variants) - set(VARIANTS))
    if strange:
        p.error(f"--variants: unknown {strange}; known: {list(VARIANTS)}")
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.passkey_contexts = [int(x) for x in args.passkey_contexts.split(",") if x]
    if args.threads:
        torch.set_num_threads(args.threads)
    from attnzoo import models

    model, tokenizer = models.load("smollm2-135m")
    run = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_at_start": os.getloadavg()[0],
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__}
    results = Results(args.out, {"args": {k: v for k, v in vars(args).items() if k != "report"}, "run": run})
    tokens = {option: getattr(args, option[2:].replace("-", "_")) for option in ("--calibration-tokens", "--moa-calibration-tokens")}
    configs = searched_configs(model, tokenizer, args.variants, args.ratios, tokens, results)
    variants = {name: variant_settings(model, name, args.ratios, configs) for name in args.variants}
    sections = {"cost": cost_section, "ppl": ppl_section, "passkey": passkey_section}
    for section in args.sections.split(","):
        names = args.passkey_policies if section == "passkey" else args.policies
        groups = {name: policy_settings(model, name, args.ratios) for name in names}
        sections[section](model, tokenizer, args, results, {**groups, **variants})
    print(report(args.out))


if __name__ == "__main__":
    main()
