"""The four attention patterns of the Comprehensive Attention Benchmark (CAB, arXiv 2210.07661):
non-causal self, causal self, non-causal cross, causal cross.

At sweep length N, self-attention has N queries and N keys; cross-attention has N keys and
``N // CROSS_QUERY_DIVISOR`` queries (a decoder attending to a longer memory, or a chunk of a
prefill over a cache when causal: the causal mask is aligned bottom-right, as everywhere in attnzoo).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgumentError
from ..method import MethodInfo

CROSS_QUERY_DIVISOR = 4


@dataclass(frozen=True)
class Pattern:
    """One of CAB's patterns; ``name`` is its command-line and store spelling (``causal-cross``)."""

    name: str
    causal: bool
    cross: bool

    @property
    def title(self) -> str:
        return f"{'causal' if self.causal else 'non-causal'} {'cross' if self.cross else 'self'}"

    def query_length(self, length: int) -> int:
        """Queries at sweep length ``length`` (the number of keys)."""
        return max(1, length // CROSS_QUERY_DIVISOR) if self.cross else length

    def unsupported_reason(self, info: MethodInfo) -> str | None:
        """Why the method cannot run this pattern by its declared support; None when it can."""
        if self.causal and not info.causal:
            return f"{info.name} is non-causal only"
        if not self.causal and not info.non_causal:
            return f"{info.name} is causal only"
        if self.cross and not info.cross:
            return f"{info.name} is self-attention only"
        return None


NONCAUSAL_SELF = Pattern("noncausal-self", causal=False, cross=False)
CAUSAL_SELF = Pattern("causal-self", causal=True, cross=False)
NONCAUSAL_CROSS = Pattern("noncausal-cross", causal=False, cross=True)
CAUSAL_CROSS = Pattern("causal-cross", causal=True, cross=True)
PATTERNS = (NONCAUSAL_SELF, CAUSAL_SELF, NONCAUSAL_CROSS, CAUSAL_CROSS)
BY_NAME = {p.name: p for p in PATTERNS}


def pattern_named(name: str) -> Pattern:
    if name not in BY_NAME:
        raise InvalidArgumentError("pattern", f"one of {', '.join(BY_NAME)} or all", repr(name))
    return BY_NAME[name]


def parse_patterns(text: str) -> tuple[str, ...]:
    """``"causal-self,causal-cross"`` or ``"all"`` -> the pattern names, in CAB's order."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names == ["all"]:
        return tuple(BY_NAME)
    chosen = {pattern_named(n).name for n in names}
    if not chosen:
        raise InvalidArgumentError("pattern", f"one of {', '.join(BY_NAME)} or all", repr(text))
    return tuple(n for n in BY_NAME if n in chosen)


def self_pattern(causal: bool) -> Pattern:
    return CAUSAL_SELF if causal else NONCAUSAL_SELF


def support_matrix(info: MethodInfo) -> dict[str, bool]:
    """Pattern name -> whether the method declares support for it."""
    return {p.name: p.unsupported_reason(info) is None for p in PATTERNS}
