"""Errors and argument checks shared by every method.

Every message names the argument, what was expected and what came, so a user never has to read a
torch stack trace to find a wrong shape.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class AttnzooError(ValueError):
    """Base class of every error attnzoo raises on bad input (a ``ValueError``)."""


class InvalidArgumentError(AttnzooError):
    """An argument has the wrong shape, type or value."""

    def __init__(self, argument: str, expected: str, got: object):
        self.argument, self.expected, self.got = argument, expected, got
        super().__init__(f"{argument}: expected {expected}, got {got}")


class UnsupportedError(AttnzooError):
    """The method cannot run this pattern (e.g. causal attention for a non-causal method)."""


class UnknownNameError(AttnzooError):
    """A name (method, option, model) is not registered; the message suggests the closest ones."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        self.name, self.known = name, known
        super().__init__(f"unknown {kind} {name!r}{hint} (known: {', '.join(known)})")


def check_int(argument: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` as an int, or raise if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
        except ImportError:  # pragma: no cover - numpy is a hard dependency
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(argument, f"an integer >= {minimum}", f"{value!r} ({type(value).__name__})")
    if value < minimum:
        raise InvalidArgumentError(argument, f"an integer >= {minimum}", value)
    return value


def check_float(argument: str, value: object, *, low: float, high: float, low_open: bool = False) -> float:
    """Return ``value`` as a float in [low, high] (or (low, high] with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(argument, f"a number in {'(' if low_open else '['}{low}, {high}]", repr(value))
    value = float(value)
    if not (low < value if low_open else low <= value) or value > high:
        raise InvalidArgumentError(argument, f"a number in {'(' if low_open else '['}{low}, {high}]", value)
    return value


def per_axis(argument: str, value: object, ndim: int, *, minimum: int = 1) -> tuple[int, ...]:
    """Broadcast an int or a sequence of ``ndim`` ints to a per-axis tuple (NATTEN style)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != ndim:
            raise InvalidArgumentError(argument, f"an int or {ndim} ints (one per grid axis)", tuple(value))
        return tuple(check_int(f"{argument}[{i}]", v, minimum=minimum) for i, v in enumerate(value))
    return (check_int(argument, value, minimum=minimum),) * ndim


def per_axis_bool(argument: str, value: object, ndim: int) -> tuple[bool, ...]:
    """Broadcast a bool or a sequence of ``ndim`` bools to a per-axis tuple."""
    if isinstance(value, bool):
        return (value,) * ndim
    if isinstance(value, Sequence) and len(value) == ndim and all(isinstance(v, bool) for v in value):
        return tuple(value)
    raise InvalidArgumentError(argument, f"a bool or {ndim} bools (one per grid axis)", repr(value))
