"""The mutation helper itself: a wrong rule is caught, an equivalent one is reported as a survivor."""

import types

import pytest
from fidelity.mutation import Mutant, assert_caught

ns = types.SimpleNamespace(f=lambda x: x + 1)


def check():
    assert ns.f(1) == 2


def test_caught(monkeypatch):
    assert_caught(monkeypatch, Mutant("off-by-one", ns, "f", lambda x: x + 2), check)


def test_survivor(monkeypatch):
    with pytest.raises(pytest.fail.Exception):
        assert_caught(monkeypatch, Mutant("same", ns, "f", lambda x: 1 + x), check)
