"""Passkey retrieval: a random number hidden at a chosen depth of filler text, asked for at the end.

Greedy decoding; a trial is correct when the first number in the answer equals the key. The
filler carries no information, so only attention that reaches the key's position can answer.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import InvalidArgumentError, check_float, check_int
from ..progress import progress
from .common import check_causal_lm, model_device

INTRO = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about it.\n"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyTrial:
    depth: float
    key: str
    tokens: int
    key_position: int
    answer: str
    correct: bool


@dataclass
class PasskeyResult:
    context_len: int
    trials: list[PasskeyTrial] = field(default_factory=list)

    @property
    def correct(self) -> int:
        return sum(t.correct for t in self.trials)

    @property
    def accuracy(self) -> float:
        return self.correct / len(self.trials) if self.trials else float("nan")

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "correct": self.correct, "accuracy": self.accuracy}


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def passkey_prompt(tokenizer, context_len: int, depth: float, key: str) -> tuple[torch.Tensor, int]:
    """Token ids (1, ~context_len) of the prompt with ``key`` at ``depth`` (0: start, 1: end of the
    filler), and the token position where the needle starts."""
    needle = NEEDLE.format(key=key)
    fixed = _count(tokenizer, INTRO + needle + QUESTION)
    per_filler = _count(tokenizer, FILLER * 10) / 10
    repeats = int((context_len - fixed) / per_filler)
    if repeats < 1:
        raise InvalidArgumentError("context_len", f"at least {fixed + int(per_filler) + 1} tokens for a passkey prompt", context_len)
    before = round(depth * repeats)
    head = INTRO + FILLER * before
    ids = tokenizer(head + needle + FILLER * (repeats - before) + QUESTION, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids, _count(tokenizer, head)


def passkey_plan(depths: Sequence[float], n: int = 1, seed: int = 0) -> list[tuple[float, str]]:
    """The (depth, 5-digit key) of every trial of :func:`passkey`: ``n`` random keys per depth."""
    rng = random.Random(seed)
    return [(d, str(rng.randint(10000, 99999))) for d in depths for _ in range(n)]


def answer_is(answer: str, key: str) -> bool:
    """Whether the first number in ``answer`` is ``key``."""
    found = re.search(r"\d+", answer)
    return bool(found and found.group() == key)


@torch.no_grad()
def _greedy(model, tokenizer, ids: torch.Tensor, max_new_tokens: int) -> str:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad, top_p=None, top_k=None, temperature=None)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def passkey(model, tokenizer, context_len: int = 4096, depths: Sequence[float] = (0.1, 0.35, 0.65, 0.9), n: int = 1, *,
            seed: int = 0, max_new_tokens: int = 8, show_progress: bool = True,
            on_trial: Callable[[PasskeyResult], None] | None = None) -> PasskeyResult:
    """Exact-match passkey accuracy of causal LM ``model`` over ``n`` random 5-digit keys at each
    depth of ``depths``, prompts of about ``context_len`` tokens. ``on_trial`` sees the partial
    result after every trial (to save as you go)."""
    check_causal_lm(model)
    context_len = check_int("context_len", context_len, minimum=16)
    n = check_int("n", n)
    depths = [check_float(f"depths[{i}]", d, low=0.0, high=1.0) for i, d in enumerate(depths)]
    if not depths:
        raise InvalidArgumentError("depths", "at least one depth in [0, 1]", "an empty sequence")
    result = PasskeyResult(context_len)
    for depth, key in progress(passkey_plan(depths, n, seed), f"passkey {context_len}", show_progress):
        ids, position = passkey_prompt(tokenizer, context_len, depth, key)
        answer = _greedy(model, tokenizer, ids.to(model_device(model)), max_new_tokens)
        result.trials.append(PasskeyTrial(depth, key, ids.shape[1], position, answer.strip(), answer_is(answer, key)))
        if on_trial is not None:
            on_trial(result)
    return result
