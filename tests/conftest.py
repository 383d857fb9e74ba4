import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng():
    """A fresh generator per test: every check runs on new random inputs; a failure prints
    ``rng.initial_seed()`` in the assertion context for replay."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


