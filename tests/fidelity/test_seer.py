"""`seer` (arXiv 2410.13276, Sec. 3) against its definition written out: a perturbed AttnGate's block
logits (queries mean-pooled per block, keys max-, min- and mean-pooled, one linear map per head, rotary
embeddings at block positions, scaled dot products), each query block's diagonal (causal) and first
blocks kept, the other ``top_k`` slots (or every block whose gate probability reaches ``threshold``)
by the gate's softmax over key blocks, exact softmax attention on the kept blocks. Also the mutants
that the gate's training target (``block_max_target``) and the selection must not survive."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from distill.test_seer import literal_block_max
from fidelity.mutation import Mutant, assert_caught
from fidelity.quadratic import assert_matches, expand_heads, fidelity_tests, visible

import attnzoo
from attnzoo.methods.learned import seer as seer_module

BLOCK, TOP_K, ROPE_BASE = 8, 4, 10000.0  # 40 test tokens: 5 blocks, so the gate picks 2 of the 3 free ones


def rotated(x, positions):
    """Half-split rotary embedding as complex numbers: channel pair (i, i + D/2) times e^(i p base^(-2i/D))."""
    half = x.shape[-1] // 2
    pairs = torch.complex(x[..., :half], x[..., half:])
    angles = positions[:, None] * ROPE_BASE ** (-torch.arange(half, dtype=torch.float64) / half)
    turned = pairs * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([turned.real, turned.imag], dim=-1)


def gate_probabilities(gate, q, k, causal):
    """(B, Hq, nQB, nKB) softmax over the visible key blocks of the gate's block logits."""
    nq, nk = q.shape[2], k.shape[2]
    blocks = lambda x: x.unflatten(2, (-1, BLOCK))  # noqa: E731  (the test lengths are multiples of BLOCK)
    pooled_q = blocks(q).mean(3)
    kb = blocks(expand_heads(k, q.shape[1]))
    pooled_k = torch.cat([kb.amax(3), kb.amin(3), kb.mean(3)], dim=-1)
    gq = torch.einsum("bhnd,hdg->bhng", pooled_q, gate.query.double())
    gk = torch.einsum("bhnd,hdg->bhng", pooled_k, gate.key.double())
    nqb, nkb = nq // BLOCK, nk // BLOCK
    gq = rotated(gq, torch.arange(nqb, dtype=torch.float64) + (nk - nq) / BLOCK)
    gk = rotated(gk, torch.arange(nkb, dtype=torch.float64))
    logits = gq @ gk.transpose(-1, -2) / math.sqrt(gq.shape[-1])
    if causal:
        last = (torch.arange(1, nqb + 1) * BLOCK - 1 + nk - nq) // BLOCK
        logits = logits.masked_fill(torch.arange(nkb)[None, :] > last[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1)


def kept_blocks(probs, causal, threshold):
    """(B, Hq, nQB, nKB) bool: the first block, the diagonal (causal), then the gate's choice."""
    B, H, nqb, nkb = probs.shape
    kept = torch.zeros(probs.shape, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(nqb):
                forced = [i, 0] if causal else [0]
                slots = TOP_K - len(set(forced))
                order = [j for j in probs[b, h, i].argsort(descending=True).tolist() if j not in forced and probs[b, h, i, j] > 0]
                chosen = [j for j in order if probs[b, h, i, j] >= threshold] if threshold is not None else order[:slots]
                kept[b, h, i, forced + chosen] = True
    return kept


def check_with(gen, threshold=None):
    m = attnzoo.get_method("seer", block_size=BLOCK, top_k=TOP_K, local_blocks=0, threshold=threshold, rope_base=ROPE_BASE)
    m.materialize(4, 2, 8, 6)
    with torch.no_grad():
        for p in m.gate.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))

    def reference(q, k, v, *, causal, scale):
        probs = gate_probabilities(m.gate, q.detach(), k.detach(), causal)
        allowed = kept_blocks(probs, causal, threshold).repeat_interleave(BLOCK, 2).repeat_interleave(BLOCK, 3)
        allowed = allowed & visible(q.shape[2], k.shape[2], causal)
        logits = (q @ expand_heads(k, q.shape[1]).transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
        return torch.softmax(logits, -1) @ expand_heads(v, q.shape[1])

    for causal in (True, False):
        assert_matches(m, reference, gen, causal=causal, label=f"seer threshold={threshold}")


def check(gen):
    check_with(gen)
    check_with(gen, threshold=0.2)


def _lowest_blocks_gate(original):
    def forward(self, q, k, call, block):
        logits = original(self, q, k, call, block)
        return torch.where(torch.isfinite(logits), -logits, logits)
    return forward


MUTANTS = [Mutant("gate-picks-lowest-blocks", seer_module.AttnGate, "forward", _lowest_blocks_gate(seer_module.AttnGate.forward))]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)


def mean_pooled_target(q, k, *, causal, scale, block):
    """The wrong training target: the attention map mean-pooled over tiles (MInference's view), not max-pooled."""
    nkb = -(-k.shape[2] // block)
    rows = [F.pad(p, (0, nkb * block - k.shape[2], 0, -p.shape[2] % block))
            for _, p in attnzoo.kernels.dense.exact_probabilities(q, k, causal=causal, scale=scale, chunk=block * 8)]
    pooled = F.avg_pool2d(torch.cat(rows, 2), block)
    return pooled / pooled.sum(-1, keepdim=True)


def check_target(gen):
    q, k = 2.0 * torch.randn(2, 4, 48, 8, generator=gen), torch.randn(2, 2, 48, 8, generator=gen)
    got = seer_module.block_max_target(q, k, causal=True, scale=8 ** -0.5, block=16)
    torch.testing.assert_close(got.double(), literal_block_max(q, k, causal=True, scale=8 ** -0.5, block=16), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mutant", [Mutant("target-mean-pooled", seer_module, "block_max_target", mean_pooled_target)], ids=lambda m: m.name)
def test_target_mutant_is_caught(mutant, monkeypatch, rng):
    assert_caught(monkeypatch, mutant, lambda: check_target(rng))
