"""The distillation loop: seeded, resumable, logged; only the methods' new parameters train.

    run = attnzoo.distill.distill(model, "seer", train, "out/", steps=200, val=val, layers=[0, 1])
    attnzoo.patch(model, "seer", weights="out/")

``train`` and ``val`` are tensors of model inputs, one example per row (token ids (N, T) from
:func:`text_examples`, images (N, C, H, W), ...). Step ``s`` trains on a fixed batch (a seeded
permutation per epoch), so a run resumed from its last checkpoint continues exactly as an
uninterrupted one; a Ctrl-C saves the finished steps before it stops.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError, check_int
from ..integrations.attnzoo_nn import attention_copy
from ..method import Method
from ..progress import Progress
from . import checkpoint
from .recipes import Recipe, get_recipe
from .targets import Target, target_for

VAL_BATCH = 8  # validation examples per forward pass (at least the training batch)


def check_text(text: object) -> str:
    """``text`` if it is a string with something besides whitespace; else a clear error."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError("data", "a non-empty text", "an empty text" if isinstance(text, str) else type(text).__name__)
    return text


def text_examples(tokenizer, text: str, seq_len: int, *, val_fraction: float = 0.1,
                  stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train (n, seq_len), val (m, seq_len)) token windows of ``text``; the validation windows come from
    the text's last ``val_fraction`` of tokens, so no token of one split is in the other. Training windows
    start every ``stride`` tokens (default ``seq_len``: back to back; less: overlapping)."""
    check_text(text)
    seq_len = check_int("seq_len", seq_len, minimum=2)
    stride = seq_len if stride is None else check_int("stride", stride)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    cut = len(ids) - max(seq_len, round(len(ids) * val_fraction))
    if cut < seq_len:
        raise InvalidArgumentError("data", f"a text of at least {2 * seq_len} tokens (one training and one validation window "
                                   f"of seq_len={seq_len})", f"{len(ids)} tokens")
    val = ids[cut:]
    return ids[:cut].unfold(0, seq_len, stride).contiguous(), val[: len(val) // seq_len * seq_len].view(-1, seq_len)


def batch_indices(step: int, examples: int, batch_size: int, seed: int) -> torch.Tensor:
    """The example indices of training step ``step``: consecutive slices of one seeded permutation per epoch."""
    per_epoch = max(1, examples // batch_size)
    epoch, slot = divmod(step, per_epoch)
    order = torch.randperm(examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[slot * batch_size:(slot + 1) * batch_size]


@dataclass
class DistillRun:
    """The result of :func:`distill`: ``methods`` {layer: trained Method}, the checkpoint ``folder``,
    ``steps`` done and the ``metrics`` records of this call (one dict per logged step or validation)."""

    methods: dict[int, Method]
    folder: Path
    steps: int
    metrics: list[dict[str, Any]] = field(default_factory=list)


def _check_examples(name: str, data: object) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or data.dim() < 1 or data.shape[0] == 0:
        got = f"shape {tuple(data.shape)}" if isinstance(data, torch.Tensor) else type(data).__name__
        raise InvalidArgumentError(name, "a tensor of model inputs with at least one example (one per row)", got)
    return data


def _layers(target: Target, layers: Iterable[int] | None) -> list[int]:
    if layers is None:
        return sorted(target.shapes)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise InvalidArgumentError("layers", "None or an iterable of attention-layer indices", repr(layers))
    chosen = sorted(set(layers))
    bad = [i for i in chosen if i not in target.shapes]
    if bad or not chosen:
        raise InvalidArgumentError("layers", f"attention-layer indices of the model ({min(target.shapes)}..{max(target.shapes)})", list(layers))
    return chosen


def _crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes: which data a run or a kept teacher feature belongs to."""
    return zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes())


class _Trainer:
    def __init__(self, recipe: Recipe, target: Target, methods: dict[int, Method], cache_teacher: bool, device: torch.device,
                 store: Path | None = None, fingerprint: str = ""):
        self.recipe, self.target, self.methods, self.device = recipe, target, methods, device
        # (split, example) -> layer -> teacher features; also kept on disk in ``store`` when given
        self.cache: dict[tuple[str, int], dict[int, Any]] | None = {} if cache_teacher else None
        self.store, self.fingerprint = store, fingerprint

    def _features(self, example: torch.Tensor) -> dict[int, Any]:
        """The teacher features of one example (1, ...): read from the store when it holds them."""
        key = f"{self.fingerprint}-{_crc32(example):08x}"
        path = None if self.store is None else self.store / f"{key}.safetensors"
        if path is not None:
            kept = checkpoint.load_features(path, key, self.device)
            if kept is not None:
                return kept
        teacher = self.target.teacher(example.to(self.device), list(self.methods))
        features = {i: self.recipe.teacher_features(m, teacher, i) for i, m in self.methods.items()}
        if path is not None:
            checkpoint.save_features(path, features, key)
        return features

    def step_losses(self, data: torch.Tensor, indices: torch.Tensor, split: str = "train") -> dict[str, torch.Tensor]:
        """Named losses of the examples ``indices`` of ``data``: from the teacher's features kept per example
        (each example's losses averaged), or from one teacher pass over the batch."""
        if self.cache is None:
            return self.losses(data[indices].to(self.device))
        named: dict[str, list[torch.Tensor]] = {}
        for index in indices.tolist():
            if (split, index) not in self.cache:
                self.cache[split, index] = self._features(data[index:index + 1])
            for i, method in self.methods.items():
                for name, value in self.recipe.feature_losses(method, self.cache[split, index][i]).items():
                    named.setdefault(name, []).append(value)
        return {name: torch.stack(values).mean() for name, values in named.items()}

    def losses(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named losses of one batch, each averaged over layers."""
        teacher = self.target.teacher(batch, list(self.methods))
        named: dict[str, list[torch.Tensor]] = {}
        for i, method in self.methods.items():
            for name, value in self.recipe.layer_losses(method, teacher, i).items():
                named.setdefault(name, []).append(value)
        if self.recipe.student_pass:
            student = self.target.student(batch, self.methods)
            for name, value in self.recipe.model_losses(teacher, student).items():
                named.setdefault(name, []).append(value)
        return {name: torch.stack(values).mean() for name, values in named.items()}

    @torch.no_grad()
    def validate(self, val: torch.Tensor, batch_size: int) -> dict[str, float]:
        sums: dict[str, float] = {}
        batches = range(0, len(val), batch_size)
        for start in batches:
            indices = torch.arange(start, min(start + batch_size, len(val)))
            for name, value in self.step_losses(val, indices, "val").items():
                sums[name] = sums.get(name, 0.0) + value.item() / len(batches)
        return sums


def _resume(folder: Path, config: Mapping[str, Any], methods: Mapping[int, Method], optimizer) -> int:
    """The step an earlier run in ``folder`` reached (its state loaded), or 0 for a fresh folder."""
    if not (folder / checkpoint.CONFIG).is_file():
        return 0
    saved = checkpoint.read_config(folder)
    for key, value in json.loads(json.dumps(config)).items():  # as JSON holds it (tuples become lists)
        if saved.get(key) != value:
            raise InvalidArgumentError("out", f"a new folder, or one holding this same run to resume ({key} = {value!r})",
                                       f"a checkpoint with {key} = {saved.get(key)!r} in {folder}")
    checkpoint.load_weights(folder, methods)
    checkpoint.load_optimizer(folder, optimizer)
    _truncate_metrics(folder / checkpoint.METRICS, saved["step"])
    return saved["step"]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines of steps after ``step`` (written after the last checkpoint by a run that crashed)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


@contextlib.contextmanager
def _terminate_as_interrupt():
    """While inside: SIGTERM (``kill``, a scheduler's stop) raises KeyboardInterrupt, so the loop saves
    its finished steps as on Ctrl-C (a process started in the background ignores Ctrl-C's SIGINT)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def distill(model, recipe: str | Recipe, train: torch.Tensor, out: str | Path, *, steps: int, val: torch.Tensor | None = None,
            layers: Iterable[int] | None = None, batch_size: int = 1, lr: float | None = None, seed: int = 0,
            save_every: int = 25, val_every: int | None = None, progress: bool = True,
            cache_teacher: bool | str | Path | None = None, **method_config: Any) -> DistillRun:
    """Train ``recipe``'s method (configured by ``method_config`` over the recipe's defaults) in ``layers``
    (default all) of the frozen ``model`` (a transformers model or one built from ``attnzoo.nn.Attention``)
    for ``steps`` steps of ``batch_size`` examples of ``train`` (AdamW at ``lr``, default the recipe's),
    checkpointing into ``out`` every ``save_every`` steps and at the end; ``val`` (held-out examples)
    is evaluated every ``val_every`` steps (default: at the end). A folder holding this same run resumes it.
    ``cache_teacher`` (default: whenever the recipe allows it, ``seer``'s pooled maps): run the frozen teacher
    once per training example and keep what the losses read of it (memory grows with the number of examples);
    a folder: also keep it there (safetensors, one file per example, named by what it was computed for), so
    a resumed run, or another run on the same data and method config (other steps, lr, seed), skips the teacher.
    Returns a :class:`DistillRun`."""
    recipe = get_recipe(recipe)
    steps, batch_size = check_int("steps", steps), check_int("batch_size", batch_size)
    keep_teacher = recipe.caches_teacher if cache_teacher is None else cache_teacher is not False
    if keep_teacher and not recipe.caches_teacher:
        raise InvalidArgumentError("cache_teacher", f"None or False for recipe {recipe.name!r} (its losses need a fresh teacher pass)", cache_teacher)
    store = None if isinstance(cache_teacher, bool) or cache_teacher is None else Path(cache_teacher)
    save_every = check_int("save_every", save_every)
    val_every = steps if val_every is None else check_int("val_every", val_every)
    train = _check_examples("train", train)
    if val is not None:
        val = _check_examples("val", val)
    target = target_for(model)
    chosen = _layers(target, layers)
    recipe.check(target, chosen)
    config = recipe.configure(target, method_config)
    lr = recipe.lr if lr is None else float(lr)
    shapes = {i: target.shapes[i] for i in chosen}
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    if recipe.unit == "attention":
        methods = {i: attention_copy(target.layers[i], recipe.method, config) for i in chosen}
    else:
        methods = {i: m.to(device) for i, m in checkpoint.build_methods(recipe.method, config, shapes).items()}
    parameters = [p for m in methods.values() for p in m.parameters()]
    if not parameters:
        raise InvalidArgumentError("recipe", "a method with learned parameters", f"{recipe.method!r} with none")
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    run_config = {"recipe": recipe.name, "method": recipe.method, "unit": recipe.unit, "method_config": config, "model": type(model).__name__,
                  "layers": {str(i): list(s) for i, s in shapes.items()}, "seed": seed, "batch_size": batch_size, "lr": lr,
                  "examples": list(train.shape), "data_crc32": _crc32(train)}
    folder = Path(out)
    start = _resume(folder, run_config, methods, optimizer)
    features_of = {key: run_config[key] for key in ("recipe", "method_config", "model", "layers")}
    trainer = _Trainer(recipe, target, methods, keep_teacher, device, store,
                       f"{zlib.crc32(json.dumps(features_of, sort_keys=True).encode()):08x}")
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    run, updating = DistillRun(methods, folder, start), False
    bar = Progress(steps - start, f"distill {recipe.name}", enabled=progress, unit="step")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with open(folder / checkpoint.METRICS, "a") as log, _terminate_as_interrupt():
            for step in range(start, steps):
                losses = trainer.step_losses(train, batch_indices(step, len(train), batch_size, seed))
                total = sum(losses.values())
                optimizer.zero_grad()
                total.backward()
                updating = True  # a Ctrl-C inside the update would leave the parameters half-stepped
                optimizer.step()
                run.steps, updating = step + 1, False
                record = {"step": step + 1, "split": "train", "loss": total.item(), **{k: v.item() for k, v in losses.items()}}
                if val is not None and (run.steps % val_every == 0 or run.steps == steps):
                    scores = trainer.validate(val, max(batch_size, VAL_BATCH))
                    record = {**record, **{f"val_{k}": v for k, v in scores.items()}}
                run.metrics.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.step(f"loss {total.item():.4g}")
                if run.steps % save_every == 0 or run.steps == steps:
                    checkpoint.save(folder, {**run_config, "step": run.steps, "steps": steps}, methods, optimizer)
    except KeyboardInterrupt:
        if not updating:
            checkpoint.save(folder, {**run_config, "step": run.steps, "steps": steps}, methods, optimizer)
        bar.write(f"interrupted after step {run.steps} (saved: the last checkpoint in {folder}); run the same command again to resume")
        raise
    finally:
        bar.close()
        for p in frozen:
            p.requires_grad_(True)
    for m in methods.values():
        m.eval()
    return run
