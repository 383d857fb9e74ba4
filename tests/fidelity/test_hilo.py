"""`hilo` (LITv2, arXiv 2205.13213 and ziplab/LITv2) against its heads written out: the last
int(alpha H) heads (Lo-Fi) attend to the s x s cell averages of the keys and values, the others
(Hi-Fi) inside their s x s window; with s = 1 every head attends globally."""

from __future__ import annotations

import torch
from fidelity.mutation import Mutant
from fidelity.quadratic import assert_matches, expand_heads, fidelity_tests

import attnzoo
from attnzoo.methods.local import hilo as hilo_module

HiLo = hilo_module.HiLo
ROWS, COLS = 4, 6


def reference(q, k, v, *, causal, scale, alpha, window):
    heads = q.shape[1]
    k, v = expand_heads(k, heads), expand_heads(v, heads)
    lo = heads if window == 1 else int(alpha * heads)
    cell = [(r // window) * (COLS // window) + c // window for r in range(ROWS) for c in range(COLS)]
    cell = torch.tensor(cell)
    average = (cell[None, :] == torch.arange(ROWS * COLS // window ** 2)[:, None]).double() / window ** 2
    outs = []
    for h in range(heads):
        if h >= heads - lo:  # Lo-Fi: pooled keys and values
            keys, values, seen = average @ k[:, h], average @ v[:, h], None
        else:
            keys, values, seen = k[:, h], v[:, h], cell[:, None] == cell[None, :]
        logits = (q[:, h] @ keys.transpose(-1, -2)) * scale
        if seen is not None:
            logits = logits.masked_fill(~seen, float("-inf"))
        outs.append(torch.softmax(logits, dim=-1) @ values)
    return torch.stack(outs, dim=1)


def check(gen):
    for alpha, window, heads in ((0.5, 2, 3), (0.7, 2, 4), (0.25, 1, 4)):
        m = attnzoo.get_method("hilo", grid=(ROWS, COLS), alpha=alpha, window=window)
        ref = lambda q, k, v, alpha=alpha, window=window, **kw: reference(q, k, v, alpha=alpha, window=window, **kw)  # noqa: E731
        assert_matches(m, ref, gen, causal=False, label=f"hilo alpha={alpha} s={window} H={heads}",
                       Hq=heads, Hkv=heads, Nq=ROWS * COLS)


SPLIT = HiLo._split


def rounded_split(self, call):
    """The review's finding: round(alpha H) Lo-Fi heads."""
    lo = round(self.config.alpha * call.heads_q)
    return call.heads_q - lo, (call.heads_q - lo) // call.groups


def window_one_keeps_the_split(self, call):
    """LITv2's window 1 rule dropped: int(alpha H) Lo-Fi heads, the rest in 1 x 1 windows (themselves)."""
    lo = int(self.config.alpha * call.heads_q)
    return call.heads_q - lo, (call.heads_q - lo) // call.groups


MUTANTS = [
    Mutant("round-alpha-h", HiLo, "_split", rounded_split),
    Mutant("window-1-not-global", HiLo, "_split", window_one_keeps_the_split),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
