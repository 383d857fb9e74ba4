"""The quality stage of ``attnzoo bench``: each method on real models (``attnzoo.eval``).

- approximation: relative output error and recall of the exact attention mass on real post-RoPE
  q/k/v captured from SmolLM2-135M (causal decoder) and all-MiniLM-L6-v2 (non-causal encoder),
  for every method that supports the model's causality;
- end to end, for methods that run causal (decoders): perplexity of SmolLM2 patched with the
  method, and (``full``) passkey retrieval;
- per-head heatmaps of the exact attention of a real layer, pooled to 64 x 64.

Every number is written to the store as it is taken; a method that fails is recorded and the
stage goes on. Needs the ``[models]`` extra and the weight packages (``attnzoo.models``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import AttnzooError
from ..kernels.dense import exact_probabilities
from ..progress import Progress
from ..registry import get_method, method_class
from .runner import BenchOptions, is_out_of_memory
from .patterns import CAUSAL_SELF, self_pattern
from .specs import MethodSpec, config_at
from .store import Store

DECODER, ENCODER = "smollm2-135m", "minilm-l6"
HEATMAP_SIZE = 64


@dataclass(frozen=True)
class QualityLevel:
    decoder_tokens: int
    decoder_layer_step: int | None  # None: first, middle, last layer
    encoder_tokens: int
    perplexity_windows: int
    passkey_depths: tuple[float, ...]  # empty: no passkey


LEVELS = {
    "quick": QualityLevel(decoder_tokens=1024, decoder_layer_step=None, encoder_tokens=512, perplexity_windows=1,
                          passkey_depths=()),
    "full": QualityLevel(decoder_tokens=4096, decoder_layer_step=3, encoder_tokens=512, perplexity_windows=2,
                         passkey_depths=(0.1, 0.35, 0.65, 0.9)),
}


def run_quality(store: Store, run_id: str, opts: BenchOptions, *, level: str | QualityLevel = "quick",
                progress: bool = True) -> str:
    """Run the quality stage for ``opts.methods`` at ``level`` (a name of :data:`LEVELS` or a
    :class:`QualityLevel`); returns the run's status afterwards (``interrupted`` on Ctrl-C, which
    keeps what was measured)."""
    setting = LEVELS[level] if isinstance(level, str) else level
    bar = Progress(enabled=progress)
    try:
        try:
            from .. import eval as evaluation
            from .. import models
        except ImportError as exc:  # transformers or the eval package missing
            _skip_all(store, run_id, opts.methods, f"quality needs the models extra: pip install 'attnzoo[models]' ({exc})")
            bar.write(f"quality skipped: {exc}; pip install 'attnzoo[models]'")
            return "complete"
        stage = _Stage(store, run_id, opts, setting, evaluation, bar)
        for name, tokens, causal in ((DECODER, setting.decoder_tokens, True), (ENCODER, setting.encoder_tokens, False)):
            try:
                model, tokenizer = models.load(name, cache=True)
            except AttnzooError as exc:
                _skip_all(store, run_id, opts.methods, str(exc), model=name)
                bar.write(f"quality on {name} skipped: {exc}")
                continue
            stage.approximations(name, model, tokenizer, tokens, causal)
            if causal:
                stage.end_to_end(name, model, tokenizer, tokens)
    except KeyboardInterrupt:
        store.finish_run(run_id, "interrupted")
        return "interrupted"
    finally:
        bar.close()
    return "complete"


def _skip_all(store: Store, run_id: str, specs: list[MethodSpec], message: str, model: str = "-") -> None:
    for spec in specs:
        store.add_quality(run_id, method=spec.name, spec=spec.key, config=spec.config, model=model, metric="quality",
                          value=None, status="skipped", message=message, detail=None)


class _Stage:
    def __init__(self, store: Store, run_id: str, opts: BenchOptions, setting: QualityLevel, evaluation, bar: Progress):
        self.store, self.run_id, self.opts, self.setting, self.eval, self.bar = store, run_id, opts, setting, evaluation, bar

    def _record(self, spec: MethodSpec, config: dict, model: str, metric: str, value: float | None,
                status: str = "ok", message: str | None = None, detail: Any = None) -> None:
        self.store.add_quality(self.run_id, method=spec.name, spec=spec.key, config=config, model=model, metric=metric,
                               value=value, status=status, message=message, detail=detail)
        shown = f"{value:.4g}" if value is not None else f"{status}: {(message or '')[:100]}"
        self.bar.write(f"quality {model:<13} {spec.key:<28} {metric:<18} {shown}")

    def _failure(self, spec: MethodSpec, config: dict, model: str, metric: str, exc: Exception) -> None:
        status = "skipped" if isinstance(exc, AttnzooError) else "oom" if is_out_of_memory(exc) else "error"
        self._record(spec, config, model, metric, None, status, f"{type(exc).__name__}: {str(exc)[:1000]}")

    def _layers(self, model, causal: bool) -> list[int]:
        count = model.config.num_hidden_layers
        step = self.setting.decoder_layer_step if causal else 1
        return list(range(0, count, step)) if step else sorted({0, count // 2, count - 1})

    def approximations(self, name: str, model, tokenizer, tokens: int, causal: bool) -> None:
        captured = self.eval.capture_qkv(model, tokenizer, layers=self._layers(model, causal), max_tokens=tokens)
        self._heatmaps(name, captured)
        for spec in self.opts.methods:
            info = method_class(spec.name).info
            config = config_at(spec, tokens, self_pattern(causal))
            if (causal and not info.causal) or (not causal and not info.non_causal):
                continue  # the method cannot run this model's attention
            try:
                result = self.eval.approximation(get_method(spec.name, **config), captured, show_progress=False)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded, the stage goes on
                self._failure(spec, config, name, "rel_error", exc)
                continue
            detail = {"tokens": result.tokens, "layers": [dataclasses.asdict(layer) for layer in result.layers],
                      "training_free": info.training_free}
            self._record(spec, config, name, "rel_error", result.mean_rel_error, detail=detail)
            if result.mean_recall is not None:
                self._record(spec, config, name, "mass_recall", result.mean_recall, detail={"tokens": result.tokens})

    def end_to_end(self, name: str, model, tokenizer, tokens: int) -> None:
        from ..integrations import patch, unpatch

        for spec in self.opts.methods:
            info = method_class(spec.name).info
            if not info.causal:
                continue
            config = config_at(spec, tokens, CAUSAL_SELF)
            metric = "perplexity"
            try:
                if spec.name != "dense":
                    patch(model, get_method(spec.name, **config))
                ppl = self.eval.perplexity(model, tokenizer, context_len=tokens, windows=self.setting.perplexity_windows,
                                           show_progress=False)
                self._record(spec, config, name, metric, ppl.perplexity, detail=ppl.as_dict())
                if self.setting.passkey_depths:
                    metric = "passkey_accuracy"
                    pk = self.eval.passkey(model, tokenizer, context_len=tokens, depths=self.setting.passkey_depths,
                                           show_progress=False)
                    self._record(spec, config, name, metric, pk.accuracy, detail=pk.as_dict())
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded, the stage goes on
                self._failure(spec, config, name, metric, exc)
            finally:
                unpatch(model)

    def _heatmaps(self, name: str, captured: dict) -> None:
        """Exact attention of the middle captured layer, every head, pooled to HEATMAP_SIZE^2."""
        layers = sorted(captured)
        c = captured[layers[len(layers) // 2]]
        n = min(c.q.shape[2], 512)
        q, k = c.q[:1, :, :n], c.k[:1, :, :n]
        with torch.no_grad():
            _, probs = next(exact_probabilities(q, k, causal=c.causal, scale=c.scale, chunk=n))
            probs = probs[0]
            pooled = F.adaptive_avg_pool2d(probs, HEATMAP_SIZE)
        for head, grid in enumerate(pooled):
            self.store.add_heatmap(self.run_id, model=name, layer=c.layer, head=head, label=f"exact, first {n} tokens",
                                   data=[[round(float(x), 6) for x in row] for row in grid])
