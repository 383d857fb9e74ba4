"""select_sources: non-negative Lasso relevance of calibration sources to a target."""

from __future__ import annotations

import pytest
import torch

from attnzoo.distill import select_sources
from attnzoo.distill.sources import nonnegative_lasso
from attnzoo.errors import InvalidArgumentError


def test_lasso_matches_its_optimality_conditions(rng):
    design = torch.randn(40, 6, generator=rng, dtype=torch.float64)
    target = design[:, :2] @ torch.tensor([1.5, 0.5], dtype=torch.float64) + 0.01 * torch.randn(40, generator=rng, dtype=torch.float64)
    alpha = 0.05
    w = nonnegative_lasso(design, target, alpha)
    grad = design.T @ (design @ w - target) / 40  # KKT of the non-negative Lasso
    active = w > 0
    torch.testing.assert_close(grad[active], torch.full_like(grad[active], -alpha), atol=1e-6, rtol=0)
    assert torch.all(grad[~active] >= -alpha - 1e-8)


def test_the_sources_that_make_the_target_are_chosen(rng):
    sources = {f"s{i}": torch.randn(5, 64, generator=rng) for i in range(6)}
    means = {n: x.mean(0) for n, x in sources.items()}
    target = 0.7 * means["s1"] + 0.3 * means["s4"] + 0.01 * torch.randn(64, generator=rng)
    picked = select_sources(sources, target, count=2)
    assert sorted(picked.chosen) == ["s1", "s4"]
    assert picked.weights["s1"] > picked.weights["s4"] > 0
    assert select_sources(sources, target, alpha=1e3).chosen == []  # a strong penalty keeps nothing


def test_bad_input_is_refused(rng):
    with pytest.raises(InvalidArgumentError, match="sources"):
        select_sources({}, torch.zeros(3))
    with pytest.raises(InvalidArgumentError, match="dimension 3"):
        select_sources({"a": torch.zeros(4)}, torch.zeros(3))
    with pytest.raises(InvalidArgumentError, match="target"):
        select_sources({"a": torch.zeros(4)}, torch.zeros(0))
    with pytest.raises(InvalidArgumentError, match="count"):
        select_sources({"a": torch.zeros(3)}, torch.zeros(3), count=0)
