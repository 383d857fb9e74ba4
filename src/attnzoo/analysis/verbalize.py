"""``analysis.verbalize``: model-free templated verbalisation of token attributions (Feldhus et
al., "Saliency map verbalization", 2023): the most relevant tokens, spans of adjacent relevant
tokens and the tokens that speak against the prediction, filled into fixed sentences, so the
text says only what the numbers say."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InvalidArgumentError, check_int

MARKERS = ("Ġ", "▁")  # byte-level BPE and SentencePiece word starts


def _text(pieces: Sequence[str]) -> str:
    """Tokens as text: glued where the tokenizer marks word starts (or ``##`` continuations), else spaced."""
    if any(m in p for p in pieces for m in MARKERS):
        text = "".join(pieces)
        for m in MARKERS:
            text = text.replace(m, " ")
    else:
        text = " ".join(pieces).replace(" ##", "")
    return text.strip() or "".join(pieces)


def _shown(*pieces: str) -> str:
    return repr(_text(pieces))


def _spans(indices: list[int]) -> list[list[int]]:
    """Runs of consecutive positions in sorted ``indices``."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def verbalize(tokens: Sequence[str], scores: Sequence[float] | torch.Tensor, *, top: int = 3, prediction: str | None = None,
              skip: Sequence[str] = ()) -> str:
    """A few sentences on ``scores`` (one per token of ``tokens``, positive = for the prediction):
    the ``top`` tokens by score with their share of the positive total, adjacent top tokens named
    as one phrase, and the strongest negative token if any. ``skip``: tokens never named (special
    tokens). ``prediction``: what is explained, named in the text."""
    values = [float(s) for s in (scores.tolist() if isinstance(scores, torch.Tensor) else scores)]
    if len(values) != len(tokens) or not values:
        raise InvalidArgumentError("scores", f"one score per token ({len(tokens)} tokens)", f"{len(values)} scores")
    top = check_int("top", top)
    candidates = [i for i, t in enumerate(tokens) if t not in skip]
    positive = sorted((i for i in candidates if values[i] > 0), key=lambda i: -values[i])[:top]
    subject = f"the prediction {_shown(prediction)}" if prediction is not None else "the prediction"
    if not positive:
        return f"No token supports {subject}."
    total = sum(values[i] for i in candidates if values[i] > 0)
    named = ", ".join(f"{_shown(tokens[i])} ({values[i] / total:.0%})" for i in positive)
    sentences = [f"{subject[0].upper()}{subject[1:]} rests most on {named} of the positive relevance."]
    phrases = [run for run in _spans(sorted(positive)) if len(run) > 1]
    for run in phrases:
        sentences.append(f"The phrase {_shown(*(tokens[i] for i in run))} (tokens {run[0]}-{run[-1]}) matters as a whole.")
    negative = [i for i in candidates if values[i] < 0]
    if negative:
        worst = min(negative, key=lambda i: values[i])
        sentences.append(f"{_shown(tokens[worst])} (token {worst}) speaks most against it.")
    return " ".join(sentences)
