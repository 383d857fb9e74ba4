"""`transnormer` (TransNormerLLM, arXiv 2307.14995) against its ``.reference``
(``methods/linear/naive.py``). NormAttention: ``W_ij = sum_d phi(q_i)_d phi(k_j)_d cos(theta_hd (i -
j)) lambda_h^(i-j)`` (LRPE with angles split across heads, ``theta_hd = base^(-2 (h D + d) / (H D))``;
ALiBi rates scaled per layer, ``-log lambda_h = 2^(-8 (h+1) / H) (1 - l / (L - 1) + 1e-5)``),
``O = SRMSNorm(W V)`` with the norm over all heads of a token; phi = silu (elu + 1 without LRPE,
fixed decay). DiagAttention: softmax inside blocks.
"""

from __future__ import annotations

import torch
from fidelity.mutation import Mutant
from fidelity.quadratic import assert_matches, fidelity_tests

import attnzoo
from attnzoo.methods.linear import transnormer as transnormer_module


def check(gen):
    m = attnzoo.get_method("transnormer", chunk=16)
    for causal in (False, True):
        assert_matches(m, m.reference, gen, causal=causal, label="transnormer norm")
    assert_matches(m, m.reference, gen, causal=False, label="transnormer norm cross", Nq=24, Nk=40)
    layered = attnzoo.get_method("transnormer", chunk=16, decay="alibi", layer=2, num_layers=6)
    assert_matches(layered, layered.reference, gen, causal=True, label="transnormer alibi layer 2 of 6")
    assert_matches(layered, layered.reference, gen, causal=True, label="transnormer alibi cross", Nq=24, Nk=40)
    plain = attnzoo.get_method("transnormer", chunk=16, lrpe=False, feature_map="elu", decay=0.9)
    assert_matches(plain, plain.reference, gen, causal=True, label="transnormer elu, no lrpe, decay 0.9")
    diag = attnzoo.get_method("transnormer", mode="diag", block_size=16)
    for causal in (False, True):
        assert_matches(diag, diag.reference, gen, causal=causal, label="transnormer diag")


def norm_per_head(x, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)


def same_angles_every_head(dim, base=10000.0, heads=1):
    return base ** (-2 * torch.arange(dim, dtype=torch.float64) / dim)


MUTANTS = [
    Mutant("norm-per-head", transnormer_module, "rms_normalize", norm_per_head),
    Mutant("lrpe-same-angles-every-head", transnormer_module, "lrpe_theta", same_angles_every_head),
    Mutant("no-per-layer-decay-scaling", transnormer_module, "layer_scale", lambda layer, num_layers: 1.0),
    Mutant("diag-blocks-ignored", transnormer_module.TransNormer, "_forward",
           lambda self, q, k, v, call: transnormer_module.sdpa(q, k, v, causal=call.causal, scale=call.scale)),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
