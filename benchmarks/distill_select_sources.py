"""distill.select_sources on real text sources: does distilling on the Lasso's choice of calibration
sources serve a target better than distilling on a random choice of as many?

    OMP_NUM_THREADS=1 python benchmarks/distill_select_sources.py --count 2 --seeds 4 --steps 20 --json sources.json

Sources (all on this machine, no network): docstrings of four groups of standard-library modules, the
source code of a few standard-library modules, the license texts shipped with the installed packages,
and torch's docstrings. Target: the Python language reference (:func:`attnzoo.eval.english_text`), its
first half to choose sources by (:func:`attnzoo.distill.text_features`: SmolLM2-135M's mean hidden
state per layer) and its second half to measure on. For each choice of ``--count`` sources (the
Lasso's, and ``--seeds`` random ones) hedgehog is distilled on layers ``--layers`` for ``--steps``
steps on the chosen sources' token windows (the same number of windows from each), and the target
loss is that recipe's held-out loss on the target's windows (attention-weight cross-entropy plus the
relative output error, averaged over the layers): a cheap stand-in for "how well does a method trained
on this data do on the target".
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import json
import random
import statistics
import tempfile
from pathlib import Path

import torch

import attnzoo
from attnzoo.distill import distill, select_sources, text_features
from attnzoo.eval import english_text

DOC_GROUPS = {
    "docs: text and data formats": ("re", "string", "textwrap", "difflib", "json", "csv", "html.parser", "xml.etree.ElementTree",
                                    "configparser", "tomllib", "base64", "codecs"),
    "docs: concurrency and networking": ("asyncio", "threading", "multiprocessing", "concurrent.futures", "socket", "ssl",
                                         "http.client", "urllib.request", "selectors", "queue", "subprocess"),
    "docs: numbers": ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers", "operator"),
    "docs: files and the system": ("os", "pathlib", "shutil", "glob", "tempfile", "tarfile", "zipfile", "io", "stat", "sys"),
}
SOURCE_MODULES = ("textwrap", "heapq", "bisect", "functools", "dataclasses", "enum", "fractions", "shlex")


def docstrings(modules) -> str:
    """Docstrings of ``modules`` and of their public classes and functions."""
    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)) and inspect.getdoc(obj):
                parts.append(f"{attr}: {inspect.getdoc(obj)}")
    return "\n\n".join(p for p in parts if p)


def license_texts() -> str:
    """Every distinct license file of the installed distributions."""
    texts = set()
    for dist in importlib.metadata.distributions():
        for file in dist.files or []:
            if "LICEN" in file.name.upper() or "COPYING" in file.name.upper():
                try:
                    texts.add(Path(dist.locate_file(file)).read_text(errors="ignore").strip())
                except OSError:
                    continue
    return "\n\n".join(sorted(t for t in texts if t))


def sources() -> dict[str, str]:
    """{name: text} of the candidate calibration sources."""
    texts = {name: docstrings(modules) for name, modules in DOC_GROUPS.items()}
    texts["stdlib source code"] = "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in SOURCE_MODULES)
    texts["package licenses"] = license_texts()
    texts["torch docs"] = "\n\n".join(f"{n}: {inspect.getdoc(getattr(torch.nn.functional, n))}" for n in sorted(dir(torch.nn.functional))
                                      if not n.startswith("_") and callable(getattr(torch.nn.functional, n)) and inspect.getdoc(getattr(torch.nn.functional, n)))
    return texts


def windows(tokenizer, text: str, seq_len: int, count: int) -> torch.Tensor:
    """The first ``count`` windows (count, seq_len) of ``text``'s tokens."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    have = len(ids) // seq_len
    if have < count:
        raise SystemExit(f"a source has {have} windows of {seq_len} tokens, fewer than --per-source {count}")
    return ids[: count * seq_len].view(count, seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--per-source", type=int, default=12, help="training windows taken from each chosen source")
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 15])
    parser.add_argument("--json", default="sources.json")
    args = parser.parse_args()
    model, tokenizer = attnzoo.models.load("smollm2-135m")
    texts = sources()
    target_text = english_text()
    half = len(target_text) // 2
    target_pool, target_eval = target_text[:half], target_text[half:]
    result = {"count": args.count, "steps": args.steps, "seq_len": args.seq_len, "per_source": args.per_source, "layers": args.layers,
              "source_tokens": {n: len(tokenizer(t, add_special_tokens=False)["input_ids"]) for n, t in texts.items()}, "runs": []}
    save = lambda: Path(args.json).write_text(json.dumps(result, indent=1) + "\n")  # noqa: E731
    features = {n: text_features(model, tokenizer, t) for n, t in texts.items()}
    choice = select_sources(features, text_features(model, tokenizer, target_pool), count=args.count)
    result["lasso_weights"], result["lasso_choice"] = choice.weights, choice.chosen
    print(f"lasso weights {json.dumps({n: round(w, 4) for n, w in choice.weights.items()})}; chosen {choice.chosen}", flush=True)
    save()
    target = windows(tokenizer, target_eval, args.seq_len, 8)
    data = {n: windows(tokenizer, t, args.seq_len, args.per_source) for n, t in texts.items()}

    def target_loss(chosen: list[str]) -> float:
        train = torch.cat([data[n] for n in chosen])
        with tempfile.TemporaryDirectory() as folder:
            run = distill(model, "hedgehog", train, folder, steps=args.steps, val=target, layers=args.layers, progress=False)
        return run.metrics[-1]["val_attention_ce"] + run.metrics[-1]["val_output_mse"]

    picks = [("lasso", choice.chosen)] + [(f"random seed {s}", sorted(random.Random(s).sample(sorted(texts), args.count))) for s in range(args.seeds)]
    for label, chosen in picks:
        loss = target_loss(chosen)
        result["runs"].append({"choice": label, "sources": chosen, "target_loss": loss})
        print(f"{label:16s} {chosen} target loss {loss:.4f}", flush=True)
        save()
    randoms = [r["target_loss"] for r in result["runs"][1:]]
    result["lasso_target_loss"], result["random_mean_target_loss"] = result["runs"][0]["target_loss"], statistics.mean(randoms)
    print(f"lasso {result['lasso_target_loss']:.4f} vs random mean {statistics.mean(randoms):.4f} (sd {statistics.pstdev(randoms):.4f})")
    save()


if __name__ == "__main__":
    main()
