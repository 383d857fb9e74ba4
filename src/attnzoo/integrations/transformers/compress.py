"""KV-cache policies in real generation: ``with attnzoo.compress(model, "snapkv", ratio=0.25): model.generate(...)``.

How it works, through transformers' public pieces only:

- a forward pre-hook on the model swaps each ``DynamicLayer`` of the cache it is given (or
  creates) for a :class:`CompressedLayer`, which stores each key / value head's kept keys densely
  (B, Hkv, S, D): every head keeps its own S keys, and evicted keys are freed, not masked;
- the layer reports the tokens seen as its sequence length (so positions and RoPE stay those of
  the uncompressed sequence) and the mask sizes of what it stores (``get_mask_sizes``: S keys
  at offset seen - S);
- attention runs through attnzoo's attention function (a temporary empty patch when the model is
  not patched; patched layers keep their methods), whose capture hook hands each layer's post-RoPE
  queries and mask to the layer after ``cache.update`` and before attention: the layer labels the
  new keys (padding from the mask), keeps the policy's running state (the latest queries, the
  accumulated attention) and, when it holds more than its target, keeps each head's top-S keys.

Prefill and decode are told apart by how many keys a call appends: a call that appends more than
one (a prompt, or a prompt's chunk) compresses to the target at once; single-token decode steps
compress every ``interval`` tokens beyond it. The attention of the call that compresses still
sees every key; the cache after it holds S. Every layer holds the same S (transformers builds one
mask for all layers from layer 0's sizes), so every attention layer gets a policy and one budget.

Padding (left, as ``generate`` pads): a sequence with at most S real tokens keeps its last S
entries (its real tokens and the padding just before them); a longer one keeps S real tokens. So
every sequence's stored padding comes first, and the mask transformers builds for the stored
length stays right.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

try:
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("attnzoo.compress needs Hugging Face transformers: pip install 'attnzoo[models]' (or pip install transformers)") from e

from ...cache import CachePolicy, get_policy
from ...cache.base import CacheView
from ...errors import InvalidArgumentError, UnsupportedError, check_float, check_int
from .adapter import CAPTURE_ATTR, attention_modules, current_patch, install, unpatch
from .padding import bool_mask
from .plan import layer_index


@dataclass(frozen=True)
class Budget:
    """How many keys each head of every layer keeps: ``tokens`` (a fixed budget) or ``ratio`` of
    the longest sequence's real tokens, never fewer than ``floor`` (what the policies always keep);
    ``interval``: decode steps compress once the cache holds that many keys beyond the target
    (None: only prompts are compressed); ``chunked``: prompts are prefilled in chunks. Without
    either, the latest queries are not kept between calls (nothing later would read them)."""

    ratio: float | None
    tokens: int | None
    floor: int
    interval: int | None
    chunked: bool = False

    def target(self, real_tokens: int) -> int:
        if self.tokens is not None:
            return self.tokens
        return max(self.floor, math.ceil(self.ratio * real_tokens))


class CompressedLayer(DynamicLayer):
    """One attention layer's compressed cache: ``keys`` (B, Hkv, S, D) and ``values`` (B, Hkv, S,
    Dv), each head's own kept keys in sequence order; ``positions`` (B, Hkv, S) int32, each key's
    index among its sequence's real tokens (-1: padding); ``accumulated`` (B, Hkv, S) float32, the
    attention each key has received (cumulative policies only); ``queries`` (B, Hq, w, D), the
    latest w = ``policy.observation`` queries. ``seen``: tokens appended so far, the sequence
    length transformers sees."""

    def __init__(self, policy: CachePolicy, budget: Budget):
        super().__init__()
        self.policy, self.budget = policy, budget
        self.positions: torch.Tensor | None = None
        self.accumulated: torch.Tensor | None = None
        self.queries: torch.Tensor | None = None
        self.real: torch.Tensor | None = None  # (B,) real tokens seen per sequence
        self.seen = 0
        self.pending = 0  # keys appended by the last update, not yet labelled

    @classmethod
    def adopt(cls, layer: DynamicLayer, policy: CachePolicy, budget: Budget) -> CompressedLayer:
        """A compressed layer holding what ``layer`` holds (every token taken as real)."""
        new = cls(policy, budget)
        if layer.is_initialized and layer.keys.numel():
            new.update(layer.keys, layer.values)
            b, n = layer.keys.shape[0], layer.keys.shape[-2]
            new.pending = 0
            new.real = torch.full((b,), n, dtype=torch.long, device=layer.keys.device)
            new.positions = torch.arange(n, dtype=torch.int32, device=layer.keys.device).expand(*layer.keys.shape[:2], n).contiguous()
            if policy.cumulative:
                new.accumulated = torch.zeros(layer.keys.shape[:3], dtype=torch.float32, device=layer.keys.device)
        return new

    # ---- what transformers calls --------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        self.pending += key_states.shape[-2]
        self.seen += key_states.shape[-2]
        return keys, values

    def stored(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        """(kv length, kv offset) of the mask: the stored keys sit at the last positions. ``query``:
        the query length (transformers >= 5.3) or the queries' cache positions (before)."""
        stored = self.stored()
        return stored + (query.shape[0] if isinstance(query, torch.Tensor) else query), self.seen - stored

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedError("attnzoo.compress: a compressed cache cannot be cropped (assisted / speculative decoding "
                               "rolls back tokens the policy may already have evicted)")

    def _batch_op(self, op: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in ("keys", "values", "positions", "accumulated", "queries", "real"):
            tensor = getattr(self, name)
            if tensor is not None and tensor.numel():
                setattr(self, name, op(tensor))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_op(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_op(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_op(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        super().reset()
        self.positions = self.accumulated = self.queries = self.real = None
        self.seen = self.pending = 0

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds (what its memory is)."""
        return [t for t in (self.keys, self.values, self.positions, self.accumulated, self.queries, self.real) if t is not None]

    # ---- what the attention hook calls --------------------------------------------------------
    def observe(self, queries: torch.Tensor, mask: torch.Tensor | None, scale: float) -> None:
        """Label the keys the last update appended, update the policy's state from ``queries``
        (B, Hq, Nq, D) and the model's ``mask`` (B|1, 1, Nq, Nk) or None, and compress when due."""
        new, self.pending = self.pending, 0
        if new == 0:
            return
        batch, kv_heads = self.keys.shape[:2]
        device = self.keys.device
        if mask is None:
            valid = torch.ones(batch, new, dtype=torch.bool, device=device)
        else:
            valid = bool_mask(mask)[:, 0, -1, -new:].expand(batch, new)
        if self.real is None:
            self.real = torch.zeros(batch, dtype=torch.long, device=device)
        index = (self.real[:, None] + valid.cumsum(dim=1) - 1).masked_fill(~valid, -1).to(torch.int32)
        self.real = self.real + valid.sum(dim=1)
        self.positions = self._appended(self.positions, index[:, None].expand(batch, kv_heads, new))
        if self.policy.cumulative:
            zeros = torch.zeros(batch, kv_heads, new, dtype=torch.float32, device=device)
            self.accumulated = self._appended(self.accumulated, zeros)
            self.accumulated += self.policy.accumulate(queries, self.keys, self.positions, scale)
        window = self.policy.observation
        latest = queries.detach() if self.queries is None else torch.cat([self.queries, queries.detach()], dim=2)
        self.queries = latest[:, :, max(0, latest.shape[2] - window):]
        target = self.budget.target(int(self.real.max()))
        excess = self.stored() - target
        if excess > 0 and (new > 1 or (self.budget.interval is not None and excess >= self.budget.interval)):
            self.keep(target, scale)
        if self.budget.interval is None and not self.budget.chunked:
            self.queries = None

    @staticmethod
    def _appended(held: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        return new if held is None else torch.cat([held, new], dim=-1)

    def keep(self, target: int, scale: float) -> None:
        """Keep each head's ``target`` best keys by the policy's score, ties to the earlier token
        (sequences with at most ``target`` real tokens keep their last ``target`` entries); the
        rest is freed."""
        view = CacheView(self.queries, self.keys, self.values, self.positions, scale, target, self.accumulated)
        scores = self.policy.score(view).float().masked_fill(self.positions < 0, float("-inf"))
        # a stable sort: equal scores (max-pooling plateaus) go to the earlier token, whatever the padding
        chosen = scores.argsort(dim=-1, descending=True, stable=True)[..., :target].sort(dim=-1).values
        stored = self.keys.shape[-2]
        last = torch.arange(stored - target, stored, device=chosen.device).expand_as(chosen)
        chosen = torch.where((self.real <= target)[:, None, None], last, chosen)
        gather = lambda t: t.gather(2, chosen[..., None].expand(*chosen.shape, t.shape[-1]))
        self.keys, self.values = gather(self.keys), gather(self.values)
        self.positions = self.positions.gather(2, chosen)
        if self.accumulated is not None:
            self.accumulated = self.accumulated.gather(2, chosen)

    def cut(self, policy: CachePolicy, budget: Budget, scale: float) -> CompressedLayer:
        """A copy of this layer, which holds every key of a prompt and the policy's state, as the
        prompt's last call under ``policy`` and ``budget`` would have left it (this layer unchanged).
        Exact because the policies score without the budget: only the top-k reads it."""
        if type(self) is not CompressedLayer:
            raise UnsupportedError(f"attnzoo.compress: a {type(self).__name__} cannot be cut; only a uniform CompressedLayer")
        if self.stored() != self.seen or self.real is None:
            raise InvalidArgumentError("cache", "a prompt's cache that kept every key (prefilled under ratio=1.0)",
                                       f"{self.stored()} keys held of {self.seen} seen")
        if repr(policy) != repr(self.policy) or (policy.observation and self.queries is None):
            raise InvalidArgumentError("cache", f"a cache prefilled under {policy!r} keeping its latest queries (interval= set)",
                                       f"{self.policy!r}, latest queries {'kept' if self.queries is not None else 'dropped'}")
        new = copy.copy(self)
        new.policy, new.budget = policy, budget
        target = budget.target(int(self.real.max()))
        if self.stored() > target:
            new.keep(target, scale)  # gathers fresh keys, values, positions and accumulated
        elif self.accumulated is not None:
            new.accumulated = self.accumulated.clone()  # decode steps add to it in place
        if budget.interval is None and not budget.chunked:
            new.queries = None
        return new


def cache_bytes(cache) -> int:
    """Bytes a transformers cache holds in its layers' tensors (keys, values and, for compressed
    layers, their bookkeeping)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        tensors = layer.tensors() if isinstance(layer, CompressedLayer) else [getattr(layer, "keys", None), getattr(layer, "values", None)]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


# ---- the handle --------------------------------------------------------------------------------
def cache_argument(model) -> str:
    """The name under which the model's forward takes its KV cache (transformers renamed it)."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise UnsupportedError(f"attnzoo.compress: {type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r}) "
                           "takes no KV cache (its forward has neither a cache nor a past_key_values argument)")


class Compression:
    """Handle returned by :func:`compress`; ``with compress(...) as model:`` removes it on exit.
    ``policies``: {layer: policy}; ``budget``: the :class:`Budget`; ``chunk``: prefill chunk size."""

    def __init__(self, model, policies: Mapping[int, CachePolicy], budget: Budget, chunk: int | None):
        self.model, self.policies, self.budget, self.chunk = model, dict(policies), budget, chunk
        self.cache = None
        self._argument = cache_argument(model)
        self._signature = inspect.signature(model.forward)
        self._modules = {layer.index: layer.module for layer in attention_modules(model)}
        if any(hasattr(m, CAPTURE_ATTR) for m in self._modules.values()):
            raise InvalidArgumentError("model", "a model without an open capture or compression", "one already hooked")
        self._own_patch = None
        self._ensure_route()
        for i in self.policies:
            setattr(self._modules[i], CAPTURE_ATTR, partial(self._observe, i))
        self._chunking = False
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def _ensure_route(self) -> None:
        """Route attention through attnzoo's function (whose hook we use): an empty patch if none."""
        if current_patch(self.model) is None:
            self._own_patch = install(self.model, {})

    def _adopt(self, cache) -> None:
        if not isinstance(cache, Cache) or not hasattr(cache, "layers"):
            raise UnsupportedError(f"attnzoo.compress: the model was given a {type(cache).__name__} as its cache; "
                                   "compression works on transformers' layered Cache (DynamicCache)")
        for i, policy in self.policies.items():
            while len(cache.layers) <= i:
                cache.layers.append(DynamicLayer())
            layer = cache.layers[i]
            if isinstance(layer, CompressedLayer):
                continue
            if type(layer) is not DynamicLayer:
                raise UnsupportedError(f"attnzoo.compress: cache layer {i} is a {type(layer).__name__}; only full-attention "
                                       "DynamicLayer caches are compressed")
            cache.layers[i] = CompressedLayer.adopt(layer, policy, self.budget)
        self.cache = cache

    def _before_forward(self, module, args, kwargs):
        if self._chunking:
            return None
        if current_patch(self.model) is None:  # unpatched since: route attention through attnzoo again
            self._ensure_route()
        bound = self._signature.bind_partial(*args, **kwargs)
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}) if "kwargs" in self._signature.parameters else {})
        if self._argument != "past_key_values" and call.get("past_key_values") is not None:  # the old name, still accepted
            call[self._argument] = call.pop("past_key_values")
        cache = call.get(self._argument)
        if cache is None:
            use_cache = call.get("use_cache")
            if not (self.model.config.use_cache if use_cache is None else use_cache):
                self.cache = None
                return None
            cache = call[self._argument] = DynamicCache(config=self.model.config)
        self._adopt(cache)
        if self.chunk is not None:
            self._prefill_chunks(call)
        return (), call

    def _prefill_chunks(self, call: dict[str, Any]) -> None:
        """Run all but the last ``chunk`` of a long input through the model, compressing after each;
        leave the last chunk in ``call`` (so the call returns the last chunk's logits)."""
        name = "input_ids" if call.get("input_ids") is not None else "inputs_embeds"
        tokens = call[name]
        length = tokens.shape[1]
        if length <= self.chunk:
            return
        mask = call.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise UnsupportedError("attnzoo.compress chunk=: a 4-D attention mask cannot be split into chunks; pass a 2-D padding mask")
        past = 0 if mask is None else mask.shape[1] - length
        last = (length - 1) // self.chunk * self.chunk

        def part(start: int, end: int) -> dict[str, Any]:
            sub = dict(call, **{name: tokens[:, start:end]})
            if mask is not None:
                sub["attention_mask"] = mask[:, :past + end]
            for key in ("position_ids", "cache_position"):
                if call.get(key) is not None:
                    sub[key] = call[key][..., start:end]
            return sub

        self._chunking = True
        try:
            for start in range(0, last, self.chunk):
                sub = part(start, start + self.chunk)
                if "logits_to_keep" in self._signature.parameters:
                    sub["logits_to_keep"] = 1
                self.model(**sub)
        finally:
            self._chunking = False
        call.update(part(last, length))

    def _observe(self, index: int, q, k, v, mask, causal: bool, scale: float, plan) -> None:
        layer = None if self.cache is None else self.cache.layers[index]
        if isinstance(layer, CompressedLayer):
            with torch.no_grad():
                layer.observe(q, mask, scale)

    def close(self) -> None:
        """Stop compressing (caches made meanwhile keep what they hold); remove the temporary patch."""
        self._hook.remove()
        for module in self._modules.values():
            if hasattr(module, CAPTURE_ATTR):
                delattr(module, CAPTURE_ATTR)
        if self._own_patch is not None and current_patch(self.model) is self._own_patch:
            unpatch(self.model)
        self._own_patch = self.cache = None

    def __enter__(self):
        return self.model

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        size = f"budget={self.budget.tokens}" if self.budget.tokens is not None else f"ratio={self.budget.ratio}"
        return f"Compression({type(self.model).__name__}, {size}, layers={len(self.policies)})"

    def cut(self, cache):
        """A copy of ``cache`` (a prompt prefilled under the same policies with ``ratio=1.0`` and
        ``interval=`` set, so every key and the latest queries stay) holding what a prefill of that
        prompt under this compression would hold: one prefill serves several budgets. Decode the
        copy while this compression is open; ``cache`` is unchanged."""
        scales = {layer.index: layer.scale or layer.head_dim ** -0.5 for layer in attention_modules(self.model)}
        layers = list(getattr(cache, "layers", []))
        for i, policy in self.policies.items():
            if i >= len(layers) or not isinstance(layers[i], CompressedLayer):
                raise InvalidArgumentError("cache", "a cache prefilled under attnzoo.compress", type(cache).__name__)
            layers[i] = layers[i].cut(policy, self.budget, scales[i])
        new = copy.copy(cache)
        new.layers = layers
        return new


# ---- building it -------------------------------------------------------------------------------
def _policy(spec: Any, config: Mapping[str, Any], where: str) -> CachePolicy:
    if isinstance(spec, CachePolicy):
        if config:
            raise InvalidArgumentError(where, "options only with a policy name (a CachePolicy is already configured)", sorted(config))
        return spec
    if isinstance(spec, str):
        return get_policy(spec, **config)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        return get_policy(spec[0], **{**config, **spec[1]})
    raise InvalidArgumentError(where, "a cache policy name, (name, config dict) or a configured CachePolicy", repr(spec))


def _layer_policies(model, policy, layers, config: Mapping[str, Any]) -> dict[int, CachePolicy]:
    found = attention_modules(model)
    indices = [layer.index for layer in found]
    for layer in found:
        if not layer.causal:
            raise UnsupportedError(f"attnzoo.compress: layer {layer.index} attends bidirectionally: "
                                   f"{type(model).__name__} is not a generating model with a KV cache")
        if layer.window is not None:
            raise UnsupportedError(f"attnzoo.compress: layer {layer.index} has a sliding window of {layer.window}; "
                                   "sliding-window caches are not compressed")
    if layers is None:
        if policy is None:
            raise InvalidArgumentError("policy", "a cache policy name or a configured CachePolicy", None)
        specs = {i: policy for i in indices}
    else:
        if policy is not None:
            raise InvalidArgumentError("policy", "None when layers gives per-layer policies", repr(policy))
        if isinstance(layers, Mapping):
            specs = {layer_index(i, indices, f"layers[{i!r}]"): spec for i, spec in layers.items()}
        elif callable(layers):
            specs = {i: layers(i) for i in indices}
        else:
            raise InvalidArgumentError("layers", "None, a dict {layer: policy} or a callable of the layer index", repr(layers))
    missing = [i for i in indices if specs.get(i) is None]
    if missing:
        raise UnsupportedError(f"attnzoo.compress: layers {missing} have no policy; every attention layer must be compressed to "
                               "the same length (transformers builds one attention mask for all layers from layer 0's cache)")
    memo: dict[int, CachePolicy] = {}
    out = {}
    for i, spec in specs.items():
        key = id(spec) if isinstance(spec, CachePolicy) else hash(repr(spec))
        out[i] = memo.setdefault(key, _policy(spec, config, f"policy for layer {i}"))
    return out


def compress(model, policy=None, *, ratio: float | None = None, budget: int | None = None, layers=None,
             interval: int | None = None, chunk: int | None = None, **config) -> Compression:
    """Compress the KV cache of a transformers ``model`` with a cache ``policy`` while it generates.

    ``policy``: a registered name (configured by ``**config``) or a :class:`CachePolicy`; or
    ``layers``: per-layer policies, a dict {layer: name | (name, config) | CachePolicy} or a
    callable of the layer index (every attention layer needs one). Exactly one of ``ratio`` (in
    (0, 1]: keep that fraction of the longest sequence's real tokens) and ``budget`` (keys kept per
    head). ``interval``: during decoding, compress back to the target whenever the cache has grown
    ``interval`` keys beyond it (None: only prompts are compressed). ``chunk``: prefill prompts
    longer than ``chunk`` tokens chunk by chunk, compressing after each, so the cache never holds
    more than the target plus one chunk (a direct ``model(...)`` call then returns the logits of
    the last chunk only). Works with :func:`patch` (either order). Returns a :class:`Compression`,
    usable as a context manager.
    """
    policies = _layer_policies(model, policy, layers, config)
    floor = max(p.minimum_budget for p in policies.values())
    if (ratio is None) == (budget is None):
        raise InvalidArgumentError("ratio, budget", "exactly one of them", f"ratio={ratio!r}, budget={budget!r}")
    if ratio is not None:
        ratio = check_float("ratio", ratio, low=0.0, high=1.0, low_open=True)
    else:
        budget = check_int("budget", budget, minimum=1)
        if budget < floor:
            needs = ", ".join(f"{p.info.name} {p!r} keeps {p.minimum_budget}" for p in {id(p): p for p in policies.values()}.values())
            raise InvalidArgumentError("budget", f"at least {floor} keys per head (the tokens the policy always keeps: {needs})", budget)
    interval = None if interval is None else check_int("interval", interval, minimum=1)
    chunk = None if chunk is None else check_int("chunk", chunk, minimum=1)
    return Compression(model, policies, Budget(ratio, budget, floor, interval, chunk is not None), chunk)
