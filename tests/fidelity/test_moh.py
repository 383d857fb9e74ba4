"""`moh` (arXiv 2410.11842, Eq. 3-4) against its definition written out: the first ``shared`` heads always
on; a perturbed router's softmax over the routed heads from a token's queries of all heads; the
``ceil(active H) - shared`` most probable routed heads per token, each weighted by its probability
renormalised over the picked ones times their number; exact softmax attention per head, weighted."""

from __future__ import annotations

import math

import torch
from fidelity.mutation import Mutant
from fidelity.quadratic import assert_matches, expand_heads, fidelity_tests, visible

import attnzoo
from attnzoo.methods.learned.moh import HeadRouter, MoH

ACTIVE, SHARED, HEADS = 0.75, 1, 4  # 3 of 4 heads per token: the shared one and 2 of the 3 routed


def check(gen):
    m = attnzoo.get_method("moh", active=ACTIVE, shared=SHARED)
    m.materialize(HEADS, 2, 8, 6)
    with torch.no_grad():
        for p in m.router.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    weight, bias = m.router.weight.detach().double(), m.router.bias.detach().double()

    def reference(q, k, v, *, causal, scale):
        tokens = q.transpose(1, 2).flatten(2)  # (B, N, H D): a token's queries of every head
        probs = torch.softmax(tokens @ weight + bias, -1)  # (B, N, routed)
        picked = math.ceil(ACTIVE * HEADS) - SHARED
        top = probs.topk(picked, -1).indices
        chosen = torch.zeros_like(probs).scatter(-1, top, 1.0)
        routed = chosen * probs / (chosen * probs).sum(-1, keepdim=True) * picked
        weights = torch.cat([torch.ones(*probs.shape[:2], SHARED, dtype=probs.dtype), routed], -1).transpose(1, 2)
        logits = (q @ expand_heads(k, HEADS).transpose(-1, -2) * scale).masked_fill(~visible(q.shape[2], k.shape[2], causal), float("-inf"))
        return (torch.softmax(logits, -1) @ expand_heads(v, HEADS)) * weights[..., None]

    for causal in (False, True):
        assert_matches(m, reference, gen, causal=causal, label="moh")


def _unrenormalised(self, q, call):
    """The picked heads weighted by their raw router probability times their number (no renormalisation)."""
    probs = torch.softmax(self.part(call)(q), dim=-1)
    pick = self.picked(call)
    chosen = torch.zeros_like(probs).scatter_(-1, probs.topk(pick, dim=-1).indices, 1.0)
    shared = torch.ones(*probs.shape[:2], self.config.shared, dtype=probs.dtype, device=probs.device)
    return torch.cat([shared, chosen * probs * pick], dim=-1).transpose(1, 2)


MUTANTS = [
    Mutant("router-picks-lowest", HeadRouter, "forward", lambda self, q: -(q.transpose(1, 2).flatten(2) @ self.weight.to(q.dtype) + self.bias.to(q.dtype))),
    Mutant("weights-not-renormalised", MoH, "_weights", _unrenormalised),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
