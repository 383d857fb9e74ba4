"""KV-cache policies in real generation: ``with attnzoo.compress(model, "snapkv", ratio=0.25): model.generate(...)``.

How it works, through transformers' public pieces only:

- a forward pre-hook on the model swaps each ``DynamicLayer`` of the cache it is given (or
  creates) for a :class:`CompressedLayer`, which stores each key / value head's kept keys densely
  (B, Hkv, S, D) (or per head, ragged, below): evicted keys are freed, not masked;
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
sees every key; the cache after it holds S.

Two storages. The uniform :class:`CompressedLayer` keeps one S for every head of every layer
(transformers builds one mask for all layers from layer 0's sizes) and lets the model attend over
its (B, Hkv, S, D) tensors with that mask. A ragged cache (:class:`RaggedLayer`, chosen when heads
or layers keep different numbers of keys, ``ragged=True``, or by policies that set their own
per-head budgets) stores each KV head's keys in its own tensor and attends itself: the capture
hook returns its output, computed per KV head (GQA folded, keys never copied) under a mask built
from its own positions; transformers' mask then covers only the keys a call appends, and is read
only for which of them are padding. :class:`DiffQKVLayer` (Sigma's DiffQKV) attends itself the
same way over fewer K heads than V heads. The layers of one cache all attend themselves or none.

Padding (left, as ``generate`` pads): a sequence with at most S real tokens keeps its last S
entries (its real tokens and the padding just before them); a longer one keeps S real tokens. So
every sequence's stored padding comes first, and the mask transformers builds for the stored
length stays right (a ragged head does the same with its own S).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

try:
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("attnzoo.compress needs Hugging Face transformers: pip install 'attnzoo[models]' (or pip install transformers)") from e

from ...cache import CachePolicy, get_policy
from ...cache.attend import head_attention
from ...cache.base import CacheView
from ...cache.diffqkv import DiffQKV, key_groups, merge_keys
from ...cache.selective import Selective
from ...errors import InvalidArgumentError, UnsupportedError, check_float, check_int
from .adapter import CAPTURE_ATTR, attention_modules, current_patch, install, unpatch
from .padding import bool_mask
from .plan import layer_index


@dataclass(frozen=True)
class Budget:
    """How many keys each head of a layer keeps: ``tokens`` (a fixed budget, or one per KV head)
    or ``ratio`` (one, or one per KV head) of the longest sequence's real tokens, never fewer than ``floor`` (what the
    policies always keep); neither: the policy sets each head's budget itself;
    ``interval``: decode steps compress once the cache holds that many keys beyond the target
    (None: only prompts are compressed); ``chunked``: prompts are prefilled in chunks. Without
    either, the latest queries are not kept between calls (nothing later would read them)."""

    ratio: float | tuple[float, ...] | None
    tokens: int | tuple[int, ...] | None
    floor: int
    interval: int | None
    chunked: bool = False

    @property
    def per_head(self) -> bool:
        """Whether each KV head has its own size (a list of budgets or ratios)."""
        return isinstance(self.tokens, tuple) or isinstance(self.ratio, tuple)

    def target(self, real_tokens: int) -> int:
        """The keys every head keeps (one size for all heads)."""
        if self.tokens is not None:
            return self.tokens
        return self._of(self.ratio, real_tokens)

    def targets(self, real_tokens: int, heads: int) -> list[int]:
        """The keys each of ``heads`` KV heads keeps."""
        if isinstance(self.tokens, tuple):
            return list(self.tokens)
        if isinstance(self.ratio, tuple):
            return [self._of(r, real_tokens) for r in self.ratio]
        return [self.target(real_tokens)] * heads

    def _of(self, ratio: float, real_tokens: int) -> int:
        return max(self.floor, math.ceil(ratio * real_tokens))


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

    def adopt(self, layer: DynamicLayer) -> CompressedLayer:
        """This layer, now holding what ``layer`` holds (every token taken as real)."""
        if layer.is_initialized and layer.keys.numel():
            self.update(layer.keys, layer.values)
            b, n = layer.keys.shape[0], layer.keys.shape[-2]
            self.pending = 0
            self.real = torch.full((b,), n, dtype=torch.long, device=layer.keys.device)
            self._adopt_labels(n)
        return self

    def _adopt_labels(self, tokens: int) -> None:
        """Label the ``tokens`` adopted keys as real, in order."""
        shape, device = self.keys.shape[:3], self.keys.device
        self.positions = torch.arange(tokens, dtype=torch.int32, device=device).expand(shape).contiguous()
        if self.policy.cumulative:
            self.accumulated = torch.zeros(shape, dtype=torch.float32, device=device)

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
    def observe(self, queries: torch.Tensor, mask: torch.Tensor | None, scale: float, deferred: bool = False) -> torch.Tensor | None:
        """Label the keys the last update appended, update the policy's state from ``queries``
        (B, Hq, Nq, D) and the model's ``mask`` (B|1, 1, Nq, Nk) or None, and compress when due.
        Returns what :meth:`_attend` returns: here None, attention is left to the model (over what
        ``update`` returned), so ``deferred`` is moot."""
        new, self.pending = self.pending, 0
        if new == 0:
            return None
        batch, kv_heads = self.keys.shape[:2]
        index = self._label(new, mask, batch, self.keys.device)
        self.positions = self._appended(self.positions, index[:, None].expand(batch, kv_heads, new))
        if self.policy.cumulative:
            zeros = torch.zeros(batch, kv_heads, new, dtype=torch.float32, device=self.keys.device)
            self.accumulated = self._appended(self.accumulated, zeros)
        out = self._attend(queries, scale, deferred)
        self._remember(queries)
        target = self.budget.target(int(self.real.max()))
        if self._due(self.stored() - target, new):
            self.keep(target, scale)
        self._forget_queries()
        return out

    def _attend(self, queries: torch.Tensor, scale: float, deferred: bool) -> torch.Tensor | None:
        """Add what ``queries`` give each key to the policy's running total (cumulative policies);
        None: the model attends."""
        if self.policy.cumulative:
            self.accumulated += self.policy.accumulate(queries, self.keys, self.positions, scale)
        return None

    def _label(self, new: int, mask: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """(B, new) int32: each appended key's index among its sequence's real tokens, -1 for
        padding (read from the last row of ``mask``); counts the real ones in ``real``."""
        if mask is None:
            valid = torch.ones(batch, new, dtype=torch.bool, device=device)
        else:
            valid = bool_mask(mask)[:, 0, -1, -new:].expand(batch, new)
        if self.real is None:
            self.real = torch.zeros(batch, dtype=torch.long, device=device)
        index = (self.real[:, None] + valid.cumsum(dim=1) - 1).masked_fill(~valid, -1).to(torch.int32)
        self.real = self.real + valid.sum(dim=1)
        return index

    def _remember(self, queries: torch.Tensor) -> None:
        latest = queries.detach() if self.queries is None else torch.cat([self.queries, queries.detach()], dim=2)
        self.queries = latest[:, :, max(0, latest.shape[2] - self.policy.observation):]

    def _due(self, excess: int, new: int) -> bool:
        """Whether a head holding ``excess`` keys beyond its target is cut now, after a call that appended ``new``."""
        return excess > 0 and (new > 1 or (self.budget.interval is not None and excess >= self.budget.interval))

    def _forget_queries(self) -> None:
        if self.budget.interval is None and not self.budget.chunked:
            self.queries = None

    @staticmethod
    def _appended(held: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        return new if held is None else torch.cat([held, new], dim=-1)

    def keep(self, target: int, scale: float) -> None:
        """Keep each head's ``target`` best keys by the policy's score (:func:`best_keys`); the rest is freed."""
        view = CacheView(self.queries, self.keys, self.values, self.positions, scale, target, self.accumulated)
        scores = self.policy.score(view).float().masked_fill(self.positions < 0, float("-inf"))
        chosen = best_keys(scores, target, self.real)
        gather = lambda t: t.gather(2, chosen[..., None].expand(*chosen.shape, t.shape[-1]))
        self.keys, self.values = gather(self.keys), gather(self.values)
        self.positions = self.positions.gather(2, chosen)
        if self.accumulated is not None:
            self.accumulated = self.accumulated.gather(2, chosen)

    def cut(self, policy: CachePolicy, budget: Budget, scale: float) -> CompressedLayer:
        """A copy of this layer, which holds every key of a prompt and the policy's state, as the
        prompt's last call under ``policy`` and ``budget`` would have left it (this layer unchanged).
        Exact because the policies score without the budget: only the top-k reads it."""
        if type(self) not in (CompressedLayer, SelectiveLayer):
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


def best_keys(scores: torch.Tensor, target: int, real: torch.Tensor) -> torch.Tensor:
    """(B, ..., target) sorted indices of the ``target`` best of ``scores`` (B, ..., S), ties to
    the earlier token (a stable sort: max-pooling plateaus go to the earlier key, whatever the
    padding); rows whose sequence has at most ``target`` ``real`` (B,) tokens keep their last
    ``target`` entries (their real tokens and the padding just before them)."""
    chosen = scores.argsort(dim=-1, descending=True, stable=True)[..., :target].sort(dim=-1).values
    stored = scores.shape[-1]
    last = torch.arange(stored - target, stored, device=chosen.device).expand_as(chosen)
    short = (real <= target).reshape(-1, *[1] * (chosen.dim() - 1))
    return torch.where(short, last, chosen)


class AttendsItself:
    """For compressed layers that attend over what they store themselves (the capture hook returns
    their output): transformers' mask covers only the keys a call appends, from which the layer
    reads which of them are padding."""

    seen: int

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        """(kv length, kv offset) of transformers' mask: the keys the call appends. ``query``: the
        query length (transformers >= 5.3) or the queries' cache positions (before)."""
        return (query.shape[0] if isinstance(query, torch.Tensor) else query), self.seen


class SelectiveLayer(AttendsItself, CompressedLayer):
    """A :class:`CompressedLayer` under ``selective`` with ``subtract=True``: it attends itself with
    the accumulated selection subtracted from every head's logits
    (:meth:`~attnzoo.cache.selective.Selective.attend`), then adds the call's selection to
    ``accumulated``, from which the pruning scores."""

    def _attend(self, queries: torch.Tensor, scale: float, deferred: bool) -> torch.Tensor:
        if deferred:
            raise UnsupportedError("attnzoo.compress: selective with subtract=True computes the attention itself; "
                                   "it cannot run a layer attnzoo.patch also runs (unpatch the model, or subtract=False)")
        out, gained = self.policy.attend(queries, self.keys, self.values, self.positions, self.accumulated[:, 0], scale)
        self.accumulated += gained
        return out


class RaggedLayer(AttendsItself, CompressedLayer):
    """A compressed layer whose KV heads keep different numbers of keys and which computes its own
    attention. Per KV head h: ``head_keys[h]`` (B, S_h, D), ``head_values[h]`` (B, S_h, Dv),
    ``head_positions[h]`` (B, S_h) int32 (-1: padding) and, for cumulative policies,
    ``head_accumulated[h]`` (B, S_h) float32; ``queries``, ``real``, ``seen`` as in
    :class:`CompressedLayer` (whose (B, Hkv, S, D) tensors stay empty). Head h keeps
    ``budget.targets`` keys, or the policy's :meth:`~attnzoo.cache.CachePolicy.head_budgets`.

    Attention (:meth:`attend`) loops over the KV heads, each with its GQA group's queries folded as
    rows (keys never copied per query head), under the layer's own mask from its positions:
    padding hidden, causal among the keys the call appended. Transformers' mask is read only for
    which appended keys are padding (``get_mask_sizes`` makes it cover just the appended keys).
    Scoring pads the heads transiently to the longest (on the left, positions -1); only the
    stored per-head tensors count in :meth:`tensors`."""

    HEAD_LISTS = ("head_keys", "head_values", "head_positions", "head_accumulated")

    def __init__(self, policy: CachePolicy, budget: Budget, layer: int):
        super().__init__(policy, budget)
        self.layer = layer
        for name in self.HEAD_LISTS:
            setattr(self, name, None)

    def _adopt_labels(self, tokens: int) -> None:
        batch, device = self.head_keys[0].shape[0], self.head_keys[0].device
        index = torch.arange(tokens, dtype=torch.int32, device=device).expand(batch, tokens)
        self.head_positions = [index.contiguous() for _ in self.head_keys]
        if self.policy.cumulative:
            self.head_accumulated = [torch.zeros(batch, tokens, dtype=torch.float32, device=device) for _ in self.head_keys]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:  # empty (B, Hkv, 0, D) tensors: the stored keys are per head
            self.keys, self.values = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1])), value_states.new_empty(
                (*value_states.shape[:2], 0, value_states.shape[-1]))
            self.device, self.dtype, self.is_initialized = key_states.device, key_states.dtype, True
        heads = range(key_states.shape[1])
        if self.head_keys is None:
            self.head_keys = [key_states[:, h] for h in heads]
            self.head_values = [value_states[:, h] for h in heads]
        else:
            self.head_keys = [torch.cat([k, key_states[:, h]], dim=1) for h, k in zip(heads, self.head_keys)]
            self.head_values = [torch.cat([v, value_states[:, h]], dim=1) for h, v in zip(heads, self.head_values)]
        self.pending += key_states.shape[-2]
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def head_lengths(self) -> list[int]:
        """Keys each KV head holds."""
        return [] if self.head_keys is None else [k.shape[1] for k in self.head_keys]

    def stored(self) -> int:
        return max(self.head_lengths(), default=0)

    def _batch_op(self, op: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super()._batch_op(op)
        for name in self.HEAD_LISTS:
            held = getattr(self, name)
            if held is not None:
                setattr(self, name, [op(t) for t in held])

    def reset(self) -> None:
        super().reset()
        for name in self.HEAD_LISTS:
            setattr(self, name, None)

    def tensors(self) -> list[torch.Tensor]:
        lists = [t for name in self.HEAD_LISTS for t in (getattr(self, name) or [])]
        return lists + [t for t in (self.queries, self.real) if t is not None]

    def targets(self) -> list[int]:
        """Keys each KV head keeps now."""
        real, heads = int(self.real.max()), len(self.head_keys)
        own = self.policy.head_budgets(self.layer, heads, real)
        return self.budget.targets(real, heads) if own is None else own

    def observe(self, queries: torch.Tensor, mask: torch.Tensor | None, scale: float, deferred: bool = False) -> torch.Tensor | None:
        """Label the appended keys, update the policy's state, attend and compress when due.
        Returns the attention output (B, Hq, Nq, Dv) over what the layer stores, or None when
        ``deferred`` (the patch's method runs this layer) and the layer held nothing before: the
        model then attends over what ``update`` returned, the same keys."""
        new, self.pending = self.pending, 0
        batch, device = self.head_keys[0].shape[0], self.head_keys[0].device
        index = self._label(new, mask, batch, device)
        self.head_positions = [self._appended(p, index) for p in (self.head_positions or [None] * len(self.head_keys))]
        if self.policy.cumulative:
            keys, positions = self._padded(self.head_keys, 0), self._padded(self.head_positions, -1)
            gained = self.policy.accumulate(queries, keys, positions, scale)
            zeros = torch.zeros(batch, new, dtype=torch.float32, device=device)
            held = self.head_accumulated or [None] * len(self.head_keys)
            self.head_accumulated = [self._appended(a, zeros) + gained[:, h, keys.shape[2] - n:]
                                     for h, (a, n) in enumerate(zip(held, self.head_lengths()))]
        self._remember(queries)
        out = None if deferred and self.seen == new else self.attend(queries, scale)
        targets = self.targets()
        if any(self._due(n - t, new) for n, t in zip(self.head_lengths(), targets)):
            self.keep(targets, scale)
        self._forget_queries()
        return out

    @staticmethod
    def _padded(heads: list[torch.Tensor], fill: float) -> torch.Tensor:
        """(B, Hkv, S_max, ...) the per-head tensors (B, S_h, ...) left-padded with ``fill``."""
        width = max(t.shape[1] for t in heads)
        pad = lambda t: torch.cat([t.new_full((t.shape[0], width - t.shape[1], *t.shape[2:]), fill), t], dim=1)
        return torch.stack([pad(t) if t.shape[1] < width else t for t in heads], dim=1)

    def attend(self, queries: torch.Tensor, scale: float) -> torch.Tensor:
        """(B, Hq, Nq, Dv) attention of ``queries`` (B, Hq, Nq, D), the tokens of the last Nq
        stored keys, over each KV head's stored keys."""
        groups = queries.shape[1] // len(self.head_keys)
        out = [head_attention(queries[:, h * groups:(h + 1) * groups], k, v, p, scale)
               for h, (k, v, p) in enumerate(zip(self.head_keys, self.head_values, self.head_positions))]
        return torch.cat(out, dim=1)

    def keep(self, targets: list[int], scale: float) -> None:
        """Keep head h's ``targets[h]`` best keys by the policy's score (:func:`best_keys`),
        scored on the heads padded to one length; the rest is freed."""
        positions = self._padded(self.head_positions, -1)
        accumulated = None if self.head_accumulated is None else self._padded(self.head_accumulated, 0)
        budget = torch.tensor(targets, device=positions.device)[None, :, None]
        view = CacheView(self.queries, self._padded(self.head_keys, 0), self._padded(self.head_values, 0), positions, scale, budget,
                         accumulated)
        scores = self.policy.score(view).float().masked_fill(positions < 0, float("-inf"))
        width = positions.shape[2]
        for h, (held, target) in enumerate(zip(self.head_lengths(), targets)):
            if held <= target:
                continue
            chosen = best_keys(scores[:, h, width - held:], target, self.real)
            for name in self.HEAD_LISTS:
                tensors = getattr(self, name)
                if tensors is not None:
                    index = chosen if tensors[h].dim() == 2 else chosen[..., None].expand(*chosen.shape, tensors[h].shape[-1])
                    tensors[h] = tensors[h].gather(1, index)


class DiffQKVLayer(AttendsItself, CompressedLayer):
    """Sigma's differential K/V (:class:`~attnzoo.cache.diffqkv.DiffQKV`): ``keys`` (B, Hk, S, D),
    fewer heads than ``values`` (B, Hkv, S, Dv), each K head the mean of its group of the model's
    K heads (:func:`~attnzoo.cache.diffqkv.merge_keys`); ``positions`` (B, S) int32 (-1:
    padding). Keeps every token and attends itself: KV head h's query group scores K head
    ``key_groups[h]`` and reads V head h, only at its ``v_top`` best keys on calls over a held
    cache."""

    def __init__(self, policy: DiffQKV, budget: Budget, layer: int):
        super().__init__(policy, budget)
        self.layer = layer
        self.kv_heads = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.kv_heads = key_states.shape[1]
        super().update(merge_keys(key_states, self.policy.config.k_heads), value_states)
        return key_states, value_states

    def _adopt_labels(self, tokens: int) -> None:
        self.positions = torch.arange(tokens, dtype=torch.int32, device=self.keys.device).expand(self.keys.shape[0], tokens).contiguous()

    def observe(self, queries: torch.Tensor, mask: torch.Tensor | None, scale: float, deferred: bool = False) -> torch.Tensor | None:
        """Label the appended keys; (B, Hq, Nq, Dv) attention over the held cache, or None when
        ``deferred`` (a patch's method runs the layer) on the layer's first call."""
        new, self.pending = self.pending, 0
        index = self._label(new, mask, self.keys.shape[0], self.keys.device)
        self.positions = self._appended(self.positions, index)
        first = self.seen == new
        if deferred and first:
            return None
        groups = queries.shape[1] // self.kv_heads
        v_top = None if first else self.policy.config.v_top
        reads = key_groups(self.kv_heads, self.keys.shape[1])
        return torch.cat([head_attention(queries[:, h * groups:(h + 1) * groups], self.keys[:, k], self.values[:, h], self.positions,
                                         scale, v_top) for h, k in enumerate(reads)], dim=1)


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
    ``policies``: {layer: policy}; ``budget``: the :class:`Budget` of the call; ``budgets``:
    {layer: Budget} where layers differ (default: ``budget`` everywhere); ``ragged``: layers store
    each KV head's keys apart and attend themselves (:class:`RaggedLayer`); ``chunk``: prefill
    chunk size."""

    def __init__(self, model, policies: Mapping[int, CachePolicy], budget: Budget, chunk: int | None, *,
                 budgets: Mapping[int, Budget] | None = None, ragged: bool = False):
        self.model, self.policies, self.budget, self.chunk = model, dict(policies), budget, chunk
        self.budgets = {i: (budgets or {}).get(i, budget) for i in self.policies}
        self.ragged = ragged
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
            cache.layers[i] = self._new_layer(i, policy).adopt(layer)
        self.cache = cache

    def _new_layer(self, index: int, policy: CachePolicy) -> CompressedLayer:
        if isinstance(policy, DiffQKV):
            return DiffQKVLayer(policy, self.budgets[index], index)
        if isinstance(policy, Selective) and policy.config.subtract:
            if self.ragged:
                raise UnsupportedError("attnzoo.compress: selective with subtract=True keeps one budget for every layer "
                                       "(a uniform cache); it cannot run on a ragged one (per-layer budgets or ragged=True)")
            return SelectiveLayer(policy, self.budgets[index])
        if self.ragged:
            return RaggedLayer(policy, self.budgets[index], index)
        return CompressedLayer(policy, self.budgets[index])

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

    def _observe(self, index: int, q, k, v, mask, causal: bool, scale: float, plan) -> torch.Tensor | None:
        """The capture hook: the layer's attention output (B, Hq, Nq, Dv) when it attends itself, else None."""
        layer = None if self.cache is None else self.cache.layers[index]
        if not isinstance(layer, CompressedLayer):
            return None
        with torch.no_grad():
            return layer.observe(q, mask, scale, plan is not None)

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
            layers[i] = layers[i].cut(policy, self.budgets[i], scales[i])
        new = copy.copy(cache)
        new.layers = layers
        return new


# ---- building it -------------------------------------------------------------------------------
SIZE_KEYS = ("ratio", "budget")  # a layer's (name, config) may carry its own size


def _policy(spec: Any, config: Mapping[str, Any], where: str) -> CachePolicy:
    if isinstance(spec, CachePolicy):
        if config:
            raise InvalidArgumentError(where, "options only with a policy name (a CachePolicy is already configured)", sorted(config))
        return spec
    if isinstance(spec, str):
        return get_policy(spec, **config)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        return get_policy(spec[0], **{**config, **{k: v for k, v in spec[1].items() if k not in SIZE_KEYS}})
    raise InvalidArgumentError(where, "a cache policy name, (name, config dict) or a configured CachePolicy", repr(spec))


def _layer_specs(model, policy, layers) -> dict[int, Any]:
    """{layer: policy spec} for every attention layer of ``model``."""
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
        raise UnsupportedError(f"attnzoo.compress: layers {missing} have no policy; every attention layer must be compressed "
                               "(one mask serves all layers: transformers builds it from layer 0's cache)")
    return specs


def _layer_policies(specs: Mapping[int, Any], config: Mapping[str, Any]) -> dict[int, CachePolicy]:
    memo: dict[int, CachePolicy] = {}
    out = {}
    for i, spec in specs.items():
        key = id(spec) if isinstance(spec, CachePolicy) else hash(repr(spec))
        out[i] = memo.setdefault(key, _policy(spec, config, f"policy for layer {i}"))
    return out


def _size(index: int, spec: Any, ratio, budget) -> tuple[Any, Any, str]:
    """(ratio, budget, where) of layer ``index``: its own from a (name, {"budget": ...}) spec
    (``where``: the prefix naming it in errors), else the call's."""
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], Mapping) and any(k in spec[1] for k in SIZE_KEYS):
        return spec[1].get("ratio"), spec[1].get("budget"), f"layers[{index}] "
    return ratio, budget, ""


def _budget(policy: CachePolicy, ratio, budget, kv_heads: int, interval: int | None, chunked: bool, where: str) -> Budget:
    """A checked :class:`Budget` for ``policy`` on a layer with ``kv_heads`` KV heads; ``where``
    prefixes the argument names in errors (a layer's own size)."""
    floor = policy.minimum_budget
    if policy.sets_budget:
        if ratio is not None or budget is not None:
            raise InvalidArgumentError(f"{where}ratio, budget", f"neither: {policy.info.name} sets each head's budget itself",
                                       f"ratio={ratio!r}, budget={budget!r}")
        return Budget(None, None, floor, interval, chunked)
    if (ratio is None) == (budget is None):
        raise InvalidArgumentError(f"{where}ratio, budget", "exactly one of them", f"ratio={ratio!r}, budget={budget!r}")
    if ratio is not None:
        if isinstance(ratio, (list, tuple)):
            ratios = tuple(check_float(f"{where}ratio[{h}]", r, low=0.0, high=1.0, low_open=True)
                           for h, r in enumerate(_per_head(policy, f"{where}ratio", ratio, kv_heads, "float")))
            return Budget(ratios, None, floor, interval, chunked)
        return Budget(check_float(f"{where}ratio", ratio, low=0.0, high=1.0, low_open=True), None, floor, interval, chunked)
    if isinstance(budget, (list, tuple)):
        tokens = tuple(check_int(f"{where}budget[{h}]", b) for h, b in enumerate(_per_head(policy, f"{where}budget", budget, kv_heads, "int")))
    else:
        tokens = check_int(f"{where}budget", budget)
    if min(tokens if isinstance(tokens, tuple) else (tokens,)) < floor:
        raise InvalidArgumentError(f"{where}budget", f"at least {floor} keys per head (the tokens {policy!r} always keeps)", budget)
    return Budget(None, tokens, floor, interval, chunked)


def _per_head(policy: CachePolicy, argument: str, sizes: Sequence, kv_heads: int, kind: str) -> Sequence:
    """``sizes`` if it holds one size per KV head and the policy can keep different tokens per head."""
    if len(sizes) != kv_heads:
        raise InvalidArgumentError(argument, f"one {kind}, or {kv_heads} (one per KV head)", f"{len(sizes)} values")
    if len(set(sizes)) > 1 and not policy.per_head:
        raise UnsupportedError(f"attnzoo.compress: {policy.info.name} keeps the same tokens on every head; "
                               f"per-head sizes {list(sizes)} do not apply")
    return sizes


def compress(model, policy=None, *, ratio: float | Sequence[float] | None = None, budget: int | Sequence[int] | None = None, layers=None,
             interval: int | None = None, chunk: int | None = None, ragged: bool | None = None, **config) -> Compression:
    """Compress the KV cache of a transformers ``model`` with a cache ``policy`` while it generates.

    ``policy``: a registered name (configured by ``**config``) or a :class:`CachePolicy`; or
    ``layers``: per-layer policies, a dict {layer: name | (name, config) | CachePolicy} or a
    callable of the layer index (every attention layer needs one); a (name, config) may carry the
    layer's own ``ratio`` or ``budget``. Exactly one of ``ratio`` (in (0, 1]: keep that fraction of
    the longest sequence's real tokens, or a list of one per KV head) and ``budget`` (keys kept per
    head, or a list of one per KV head), unless the policy sets its budgets itself (``moa_cache``, ``diffqkv``): then neither.
    ``interval``: during decoding, compress back to the target whenever the cache has grown
    ``interval`` keys beyond it (None: only prompts are compressed). ``chunk``: prefill prompts
    longer than ``chunk`` tokens chunk by chunk, compressing after each, so the cache never holds
    more than the target plus one chunk (a direct ``model(...)`` call then returns the logits of
    the last chunk only). ``ragged``: store each KV head's keys apart and let each layer attend
    over them itself (:class:`RaggedLayer`); None: when heads or layers keep different numbers of
    keys or the policy needs it; False refuses those. Works with :func:`patch` (either order; a
    ragged layer runs the patch's method only on the first call it sees). Returns a
    :class:`Compression`, usable as a context manager.
    """
    interval = None if interval is None else check_int("interval", interval, minimum=1)
    chunk = None if chunk is None else check_int("chunk", chunk, minimum=1)
    specs = _layer_specs(model, policy, layers)
    policies = _layer_policies(specs, config)
    kv_heads = {layer.index: layer.kv_heads for layer in attention_modules(model)}
    budgets = {}
    for i, spec in specs.items():
        layer_ratio, layer_budget, where = _size(i, spec, ratio, budget)
        budgets[i] = _budget(policies[i], layer_ratio, layer_budget, kv_heads[i], interval, chunk is not None, where)
        if isinstance(policies[i], DiffQKV):
            key_groups(kv_heads[i], policies[i].config.k_heads)  # refuses more K heads than the layer has
        elif policies[i].sets_budget:
            policies[i].head_budgets(i, kv_heads[i], 1)  # refuses rules that do not fit the layer
    needs = _ragged_reason(policies, budgets)
    if ragged is None:
        ragged = needs is not None
    elif not isinstance(ragged, bool):
        raise InvalidArgumentError("ragged", "True, False or None", repr(ragged))
    elif not ragged and needs is not None:
        raise InvalidArgumentError("ragged", f"True or None ({needs} needs a ragged cache)", False)
    first = budgets[min(budgets)]
    return Compression(model, policies, first, chunk, budgets=budgets, ragged=ragged)


def _ragged_reason(policies: Mapping[int, CachePolicy], budgets: Mapping[int, Budget]) -> str | None:
    """Why the cache must be ragged (its layers attending themselves), or None."""
    for i, policy in policies.items():
        if policy.sets_budget:
            return f"{policy.info.name} (layer {i})"
        if budgets[i].per_head:
            return f"per-head budgets (layer {i})"
    if len({(b.ratio, b.tokens) for b in budgets.values()}) > 1:
        return "different budgets per layer"
    return None
