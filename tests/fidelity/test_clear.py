"""`clear` (arXiv 2412.16112 and Huage001/CLEAR) against its window written out: grid query i sees
key j when ``|c_i - c_j|^2 < r^2`` (strict, the official mask), the global tokens see and are seen
by everything, and with ``down_factor`` f grid queries also see the f x f cell averages of the
grid's keys and values under the same softmax."""

from __future__ import annotations

import torch
from fidelity.mutation import Mutant
from fidelity.quadratic import SCALE, assert_matches, expand_heads, fidelity_tests

import attnzoo
from attnzoo.methods.local import clear as clear_module

Clear = clear_module.Clear
ROWS, COLS, GLOBAL = 6, 8, 2


def reference(q, k, v, *, causal, scale, radius, factor):
    heads = q.shape[1]
    k, v = expand_heads(k, heads), expand_heads(v, heads)
    cells = [(r, c) for r in range(ROWS) for c in range(COLS)]
    n = GLOBAL + len(cells)
    seen = torch.ones(n, n, dtype=torch.bool)
    for i, (ri, ci) in enumerate(cells):
        for j, (rj, cj) in enumerate(cells):
            seen[GLOBAL + i, GLOBAL + j] = (ri - rj) ** 2 + (ci - cj) ** 2 < radius ** 2
    if factor > 1:
        average = torch.zeros(len(cells) // factor ** 2, n, dtype=torch.float64)
        for i, (r, c) in enumerate(cells):
            average[(r // factor) * (COLS // factor) + c // factor, GLOBAL + i] = 1 / factor ** 2
        k, v = torch.cat([k, average @ k], dim=2), torch.cat([v, average @ v], dim=2)
        pooled_seen = torch.zeros(n, average.shape[0], dtype=torch.bool)
        pooled_seen[GLOBAL:] = True  # grid queries only
        seen = torch.cat([seen, pooled_seen], dim=1)
    logits = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~seen, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def check(gen):
    for radius, factor in ((2.0, 1), (3.0, 1), (2.0, 2)):
        m = attnzoo.get_method("clear", grid=(ROWS, COLS), num_global=GLOBAL, radius=radius, down_factor=factor)
        ref = lambda q, k, v, radius=radius, factor=factor, **kw: reference(q, k, v, radius=radius, factor=factor, **kw)  # noqa: E731
        assert_matches(m, ref, gen, causal=False, label=f"clear r={radius} f={factor}", Nq=GLOBAL + ROWS * COLS, scale=SCALE)


def window_with_the_rim(self, call):
    """The review's finding: dist^2 <= r^2, which adds the four keys at exactly r on the axes."""
    r2 = self.config.radius ** 2
    return self.with_globals(call, lambda h, qc, kc: sum((a - b) ** 2 for a, b in zip(qc, kc)) <= r2)


MUTANTS = [
    Mutant("window-includes-the-rim", Clear, "mask_mod", window_with_the_rim),
    Mutant("pooled-keys-dropped", Clear, "_with_pooled", lambda self, out, lse, q, k, v, call: (out, lse)),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
