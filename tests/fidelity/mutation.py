"""Mutation check: deliberately wrong variants of a method that the fidelity tests must catch.

A :class:`Mutant` replaces one attribute (a method's selection rule, a feature map, a score) by a
wrong version. ``assert_caught`` applies it with ``monkeypatch`` and runs the check (a function that
asserts the method matches its independent reference or finds a planted answer); the mutant is
caught when the check raises ``AssertionError``. A test file lists its mutants and parametrises:

    MUTANTS = [Mutant("hip-no-tree", hip_module, "_descend", lambda *a, **k: ...), ...]

    @pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
    def test_mutant_is_caught(mutant, monkeypatch):
        assert_caught(monkeypatch, mutant, check_hip_matches_reference)

so CI fails when a mutant survives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class Mutant:
    """``target.attr`` replaced by ``replacement`` (``target`` a module, class or object)."""

    name: str
    target: Any
    attr: str
    replacement: Any


def assert_caught(
    monkeypatch: pytest.MonkeyPatch, mutant: Mutant, check: Callable[[], None]
) -> None:
    """Run ``check`` with ``mutant`` applied; fail unless the check raises ``AssertionError``.

    The check is first run unmutated so that a check which fails on the real method (and would
    "catch" every mutant) is reported as such."""
    check()
    with monkeypatch.context() as patched:
        patched.setattr(mutant.target, mutant.attr, mutant.replacement)
        try:
            check()
        except AssertionError:
            return
    pytest.fail(
        f"mutant {mutant.name!r} ({mutant.attr} replaced) survived: the check passed with the wrong rule"
    )
