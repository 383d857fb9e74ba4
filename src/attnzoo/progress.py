"""One progress reporter for long loops (bench sweeps, evaluation windows, pattern search)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Progress:
    """A tqdm bar on stderr when ``enabled``, tqdm is installed and stderr is a terminal; ``write``
    prints a line above the bar (or alone, without one) when ``enabled``."""

    def __init__(self, total: int | None = None, description: str = "", enabled: bool = True, unit: str = "it"):
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=description or None, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def step(self, label: str | None = None) -> None:
        if self.bar is not None:
            if label is not None:
                self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress(items: Iterable[T], description: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """``items``, advancing a :class:`Progress` bar as each is consumed."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = Progress(total, description, enabled)
    try:
        for item in items:
            yield item
            bar.step()
    finally:
        bar.close()
