"""`seer` (arXiv 2410.13276, Sec. 3) against its literal selection (``methods/learned/naive.py``:
a perturbed AttnGate's block logits from queries mean-pooled per block, keys max-, min- and
mean-pooled, one linear map per head, rotary embeddings at block positions, scaled dot products;
each query block's always-visited blocks counted in ``top_k``, the other slots, or every block whose
gate probability reaches ``threshold``, by the gate's softmax over key blocks; exact softmax
attention on the kept blocks), self and cross attention, ragged blocks. Also the mutants that the
gate's training target (``block_max_target``) and the selection must not survive."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from distill.test_seer import literal_block_max
from fidelity.mutation import Mutant, assert_caught
from fidelity.quadratic import assert_matches, fidelity_tests

import attnzoo
from attnzoo.methods.learned import seer as seer_module

BLOCK, TOP_K = 8, 4  # 40 test tokens: 5 blocks, so the gate picks 2 of the 3 free ones
CASES = [(True, {}), (False, {}), (True, dict(Nq=24, Nk=40)), (False, dict(Nq=36))]  # (causal, shape): self, cross, ragged


def check_with(gen, threshold=None, local_blocks=0):
    m = attnzoo.get_method("seer", block_size=BLOCK, top_k=TOP_K, local_blocks=local_blocks, threshold=threshold)
    m.materialize(4, 2, 8, 6)
    with torch.no_grad():
        for p in m.gate.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    for causal, shape in CASES:
        assert_matches(m, m.reference, gen, causal=causal, label=f"seer threshold={threshold} {shape}", **shape)


def check(gen):
    check_with(gen)
    check_with(gen, threshold=0.2, local_blocks=1)


def _lowest_blocks_gate(original):
    def forward(self, q, k, call, block):
        logits = original(self, q, k, call, block)
        return torch.where(torch.isfinite(logits), -logits, logits)
    return forward


def _no_forced_blocks(call, q_block, kv_block, local_blocks):
    return torch.empty(-(-call.len_q // q_block), 0, dtype=torch.long, device=call.device)


MUTANTS = [
    Mutant("gate-picks-lowest-blocks", seer_module.AttnGate, "forward", _lowest_blocks_gate(seer_module.AttnGate.forward)),
    Mutant("gate-without-rotary", seer_module, "apply_rope", lambda x, positions, base: x),
    Mutant("no-always-visited-blocks", seer_module, "forced_blocks", _no_forced_blocks),
]

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
