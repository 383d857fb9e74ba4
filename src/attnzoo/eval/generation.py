"""What a KV-cache policy costs and keeps in real generation: cache bytes, memory, time, quality.

Each measure runs whatever the model currently does (inside ``with attnzoo.compress(...)`` or
not), so a dense run and a compressed run in the same process compare like for like:

- :func:`generation_cost`: prefill time, decode milliseconds per token (median step), the bytes the
  cache holds after prefill and at the end (summed from its tensors), and the peak resident memory
  during the run above the memory before it (sampled);
- :func:`continuation_perplexity`: perplexity of a continuation teacher-forced in one call after
  the (compressed) cache of a context.

One prefill, several budgets (what makes a table of policies x ratios affordable): every policy
scores keys without reference to the budget and a prompt is compressed once, at its end, so
:func:`keep_all` prefills a prompt under a policy keeping every key and the policy's state, and
:func:`cut` copies that cache down to one ratio, exactly as a prefill under that ratio would have
left it. For policies that read only the latest queries (not cumulative: SnapKV, StreamingLLM),
:func:`keep_all` can also start from a dense cache of the prompt's first part shared by every
policy (``dense_prefix``), prefilling under the policy only the rest (at least its observation
window).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError, check_int
from .common import check_causal_lm, english_text, model_device
from .perplexity import token_ids

_PAGE = 4096


def resident_bytes() -> int:
    """Resident memory of this process in bytes (Linux /proc; 0 where it is unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # pragma: no cover - not Linux
        return 0


class PeakMemory:
    """``with PeakMemory() as peak:`` samples resident memory every ``every`` seconds;
    ``peak.above`` is the highest sample above the memory at entry, in bytes."""

    def __init__(self, every: float = 0.005):
        self.every, self.start, self.peak = every, 0, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = resident_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())

    @property
    def above(self) -> int:
        return self.peak - self.start


def _cache_of(output):
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


@dataclass
class GenerationCost:
    """One prompt of ``prompt_tokens`` then ``new_tokens`` greedy steps: ``prefill_s``, the median
    ``decode_ms`` per step, the cache's bytes after prefill and at the end, the peak resident
    memory above the start (``peak_rss_bytes``), and the generated token ids."""

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_ms: float
    prefill_cache_bytes: int
    final_cache_bytes: int
    peak_rss_bytes: int
    tokens: list[int]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def generation_cost(model, ids: torch.Tensor, new_tokens: int = 32) -> GenerationCost:
    """Prefill ``ids`` (1, N) and decode ``new_tokens`` greedy tokens one step at a time, timing
    each phase and reading the cache's bytes; see :class:`GenerationCost`."""
    from ..integrations.transformers.compress import cache_argument, cache_bytes

    check_causal_lm(model)
    new_tokens = check_int("new_tokens", new_tokens)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise InvalidArgumentError("ids", "token ids of shape (1, N)", tuple(ids.shape))
    ids = ids.to(model_device(model))
    steps, tokens = [], []
    with PeakMemory() as peak:
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - start
        cache = _cache_of(out)
        prefill_bytes = cache_bytes(cache)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            tokens.append(int(token))
            start = time.perf_counter()
            out = model(input_ids=token, **{cache_argument(model): cache}, use_cache=True)
            steps.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
    return GenerationCost(ids.shape[1], new_tokens, prefill_s, 1e3 * statistics.median(steps), prefill_bytes, cache_bytes(cache),
                          peak.above, tokens)


@dataclass
class ContinuationPerplexity:
    """exp(mean NLL) of ``continuation`` tokens teacher-forced after a ``context``-token prompt's
    cache (compressed or not)."""

    context: int
    continuation: int
    nll: float
    perplexity: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def continuation_perplexity(model, ids: torch.Tensor, context: int, continuation: int = 512) -> ContinuationPerplexity:
    """Prefill the first ``context`` tokens of ``ids`` (1, N), then score the next
    ``continuation`` tokens in one call over that cache (each continuation token sees the cached
    context and the continuation before it); the first continuation token is predicted from the
    prefill's last logits."""
    from ..integrations.transformers.compress import cache_argument

    check_causal_lm(model)
    context, continuation = check_int("context", context, minimum=1), check_int("continuation", continuation)
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < context + continuation:
        raise InvalidArgumentError("ids", f"token ids of shape (1, >= {context + continuation})", tuple(ids.shape))
    ids = ids.to(model_device(model))
    nll = continuation_nll(model, prefill(model, ids[:, :context]), ids[:, context:context + continuation])
    return ContinuationPerplexity(context, continuation, nll, math.exp(nll))


@torch.no_grad()
def continuation_nll(model, start: Prefill, continuation: torch.Tensor) -> float:
    """Mean NLL of ``continuation`` (1, M) teacher-forced in one call after the prefilled
    ``start`` (its last logits predict the first token); extends ``start.cache``."""
    from ..integrations.transformers.compress import cache_argument

    rest = model(input_ids=continuation[:, :-1], **{cache_argument(model): start.cache}, use_cache=True)
    logits = torch.cat([start.logits, rest.logits], dim=1)[0].float()
    return float(F.cross_entropy(logits, continuation[0], reduction="mean"))


def english_ids(tokenizer, tokens: int) -> torch.Tensor:
    """(1, tokens) ids of the evaluation English text (:func:`~attnzoo.eval.english_text`)."""
    ids = token_ids(tokenizer, english_text())
    if len(ids) < tokens:
        raise InvalidArgumentError("tokens", f"at most {len(ids)} (the evaluation text's length)", tokens)
    return ids[None, :tokens]


# ---- one prefill, several budgets -----------------------------------------------------------------
@dataclass
class Prefill:
    """A prompt's ``cache`` and the ``logits`` (1, 1, V) of its last token."""

    cache: Any
    logits: torch.Tensor

    def copy(self) -> Prefill:
        """An independent copy (decoding it leaves this one as it is)."""
        return Prefill(copy.deepcopy(self.cache), self.logits)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, cache=None) -> Prefill:
    """Run ``ids`` (1, N) through ``model`` as one call, after the tokens of ``cache`` (extended in
    place) if given; whatever compression is open applies."""
    from ..integrations.transformers.compress import cache_argument

    extra = {} if cache is None else {cache_argument(model): cache}
    out = model(input_ids=ids.to(model_device(model)), use_cache=True, logits_to_keep=1, **extra)
    return Prefill(_cache_of(out), out.logits[:, -1:])


@torch.no_grad()
def greedy(model, start: Prefill, steps: int, stop: int | None = None) -> list[int]:
    """Up to ``steps`` greedy tokens decoded one at a time from ``start`` (its cache is extended),
    ending after ``stop`` (an end-of-sequence id) if it comes."""
    from ..integrations.transformers.compress import cache_argument

    name, logits, tokens = cache_argument(model), start.logits, []
    for _ in range(steps):
        token = logits[:, -1:].argmax(-1)
        tokens.append(int(token))
        if tokens[-1] == stop or len(tokens) == steps:
            break
        logits = model(input_ids=token, **{name: start.cache}, use_cache=True).logits
    return tokens


def keep_all(model, policy: str, ids: torch.Tensor, *, dense_prefix: Prefill | None = None, **config) -> Prefill:
    """``ids`` (1, N) prefilled under cache ``policy`` (a registered name, ``**config``) keeping
    every key, its latest queries and its accumulated scores: the start of :func:`cut`.
    ``dense_prefix``: an uncompressed cache of the first tokens of ``ids`` (copied, unchanged);
    only the rest is prefilled under the policy, which must read no query before it (not
    cumulative, an observation window no longer than the rest)."""
    from ..cache import get_policy
    from ..integrations.transformers.compress import compress

    cache, rest = None, ids
    if dense_prefix is not None:
        done = dense_prefix.cache.get_seq_length()
        scorer = get_policy(policy, **config)
        if scorer.cumulative or scorer.observation > ids.shape[1] - done or done >= ids.shape[1]:
            raise InvalidArgumentError("dense_prefix", f"a dense prefix leaving at least {max(1, scorer.observation)} tokens "
                                       f"of ids, for a policy that is not cumulative ({scorer!r})",
                                       f"{done} of {ids.shape[1]} tokens (cumulative: {scorer.cumulative})")
        cache, rest = copy.deepcopy(dense_prefix.cache), ids[:, done:]
    with compress(model, policy, ratio=1.0, interval=1, **config):
        return prefill(model, rest, cache)


def cut(model, policy: str, full: Prefill, ratio: float, **config) -> Prefill:
    """A copy of :func:`keep_all`'s ``full`` holding what a prefill of the same prompt under
    ``attnzoo.compress(model, policy, ratio=ratio, **config)`` would hold; decode it inside such a
    compression. ``full`` is unchanged."""
    from ..integrations.transformers.compress import compress

    handle = compress(model, policy, ratio=ratio, **config)
    try:
        return Prefill(handle.cut(full.cache), full.logits)
    finally:
        handle.close()
