"""The seeds every test's randomness comes from (tests/conftest.py): fixed per test, changed by
ATTNZOO_TEST_SEED, printed with a replay command when a test fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import SEED_ENV, seed_of

CONFTEST = Path(__file__).parents[1] / "conftest.py"


def test_seeds_are_fixed_per_test_and_follow_the_base():
    assert seed_of("tests/a.py::test_x", base=0) == seed_of("tests/a.py::test_x", base=0)
    assert seed_of("tests/a.py::test_x", base=0) != seed_of("tests/a.py::test_y", base=0)
    assert seed_of("tests/a.py::test_x", base=0) != seed_of("tests/a.py::test_x", base=1)


def test_a_failing_test_prints_its_seed_and_how_to_replay_it(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_fails.py").write_text(
        "import torch\n\n"
        "def test_fails(rng):\n"
        "    drawn = torch.randn(3, generator=rng)\n"
        "    assert torch.equal(drawn, torch.randn(3, generator=torch.Generator().manual_seed(rng.initial_seed())))\n"
        "    assert rng.initial_seed() == torch.initial_seed()  # the global generator got the same seed\n"
        "    assert False, f'drawn with seed {rng.initial_seed()}'\n"
    )
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_fails.py"], cwd=tmp_path,
                            env={**os.environ, SEED_ENV: "7"}, capture_output=True, text=True, timeout=300)
    seed = seed_of("test_fails.py::test_fails", base=7)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"drawn with seed {seed}" in result.stdout, result.stdout
    assert f"seed {seed} (base 7); replay: {SEED_ENV}=7 python -m pytest 'test_fails.py::test_fails'" in result.stdout, result.stdout
