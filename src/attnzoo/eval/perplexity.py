"""Next-token perplexity of a causal language model on real text, in windows of ``context_len`` tokens."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError, check_int
from ..progress import progress
from .common import ENGLISH_SOURCE, check_causal_lm, english_text, model_device

_LOGIT_CHUNK = 1024


@dataclass
class PerplexityResult:
    """exp(mean negative log-likelihood) over ``tokens`` predicted tokens in ``windows`` windows of
    ``context_len`` tokens each (every token of a window but the first is predicted)."""

    context_len: int
    windows: int
    tokens: int
    nll: float
    perplexity: float
    source: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """The 1-D token ids of ``text`` (no special tokens: windows start mid-text anyway)."""
    return torch.as_tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def window_nll(model, ids: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of one window (1, N); the vocabulary projection runs
    in chunks of positions so a long window never holds all N x vocab logits at once."""
    hidden = model.base_model(input_ids=ids).last_hidden_state[0]
    head = model.get_output_embeddings()
    total = 0.0
    for start in range(0, ids.shape[1] - 1, _LOGIT_CHUNK):
        stop = min(start + _LOGIT_CHUNK, ids.shape[1] - 1)
        logits = head(hidden[start:stop]).float()
        total += float(F.cross_entropy(logits, ids[0, start + 1:stop + 1], reduction="sum"))
    return total


def perplexity(model, tokenizer, text: str | None = None, context_len: int = 4096, *, windows: int = 1,
               show_progress: bool = True) -> PerplexityResult:
    """Perplexity of causal LM ``model`` on the first ``windows`` non-overlapping windows of
    ``context_len`` tokens of ``text`` (default: :func:`~attnzoo.eval.english_text`)."""
    check_causal_lm(model)
    context_len = check_int("context_len", context_len, minimum=2)
    windows = check_int("windows", windows)
    source = ENGLISH_SOURCE if text is None else "user text"
    ids = token_ids(tokenizer, english_text() if text is None else text)
    if len(ids) < context_len * windows:
        raise InvalidArgumentError("context_len", f"at most {len(ids) // windows} tokens ({windows} window(s) of this text)", context_len)
    ids = ids.to(model_device(model))
    nll = 0.0
    for w in progress(range(windows), "perplexity windows", show_progress):
        nll += window_nll(model, ids[None, w * context_len:(w + 1) * context_len])
    tokens = windows * (context_len - 1)
    return PerplexityResult(context_len, windows, tokens, nll / tokens, math.exp(nll / tokens), source)
