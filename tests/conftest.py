"""Reproducible randomness for every test.

Each test gets a fixed seed: a stable hash (CRC-32) of its node id and of the base seed, which is
0 unless the environment variable ``ATTNZOO_TEST_SEED`` sets another integer (run the suite with
another base to draw other inputs everywhere). Before each test the global generators of torch,
``random`` and numpy are seeded with it, so code that draws without a generator is reproducible
too; the ``rng`` fixture is a ``torch.Generator`` seeded with it. A failing test prints its seed
and the command that replays it. Hypothesis runs derandomized (examples from a hash of the test,
no example database), so its examples repeat as well.
"""

from __future__ import annotations

import os
import random
import zlib

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SEED_ENV = "ATTNZOO_TEST_SEED"

try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # hypothesis is a test extra; the tests that use it import it themselves
    pass
else:
    _hypothesis_settings.register_profile("attnzoo", derandomize=True, database=None)
    _hypothesis_settings.load_profile("attnzoo")


def base_seed() -> int:
    """The base seed: ``ATTNZOO_TEST_SEED`` as an integer, 0 when unset."""
    value = os.environ.get(SEED_ENV, "0")
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV}: expected an integer, got {value!r}") from None


def seed_of(nodeid: str, base: int | None = None) -> int:
    """The seed of the test ``nodeid`` under ``base`` (default :func:`base_seed`), 31 bits so that
    numpy and torch accept it."""
    base = base_seed() if base is None else base
    return zlib.crc32(f"{base}:{nodeid}".encode()) & 0x7FFFFFFF


@pytest.fixture(autouse=True)
def _seed_global_generators(request):
    """Seed torch, random and numpy with the test's seed before it runs."""
    seed = seed_of(request.node.nodeid)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.fixture
def rng(request) -> torch.Generator:
    """A torch.Generator seeded with the test's seed (``rng.initial_seed()``): fixed inputs per test;
    set ``ATTNZOO_TEST_SEED`` to draw others."""
    return torch.Generator().manual_seed(seed_of(request.node.nodeid))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Add the seed and the replay command to the report of a failing test."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seed, base = seed_of(item.nodeid), base_seed()
        replay = f"{SEED_ENV}={base} python -m pytest '{item.nodeid}'"
        report.sections.append(("attnzoo test seed", f"seed {seed} (base {base}); replay: {replay}"))
