"""`transnormer` (TransNormerLLM, arXiv 2307.14995) against its formulas written out.

NormAttention: ``W_ij = sum_d phi(q_i)_d phi(k_j)_d cos(theta_hd (i - j)) lambda_h^(i-j)`` (LRPE
with angles split across heads, ``theta_hd = base^(-2 (h D + d) / (H D))``; ALiBi rates scaled per
layer, ``-log lambda_h = 2^(-8 (h+1) / H) (1 - l / (L - 1) + 1e-5)``), ``O = SRMSNorm(W V)`` with
the norm over all heads of a token; phi = silu. DiagAttention: softmax inside blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fidelity.mutation import Mutant
from fidelity.quadratic import (
    assert_matches,
    distance,
    expand_heads,
    fidelity_tests,
    visible,
)

import attnzoo
from attnzoo.methods.linear import transnormer as transnormer_module

EPS = 1e-6


def rates(heads: int, layer: int, num_layers: int) -> torch.Tensor:
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, dtype=torch.float64) / heads)
    return torch.exp(-slopes * (1 - layer / (num_layers - 1) + 1e-5))


def norm_attention(q, k, v, *, causal, scale, decay=None, base=10000.0):
    heads, dim, nq, nk = q.shape[1], q.shape[-1], q.shape[2], k.shape[2]
    qf, kf, v = F.silu(q), F.silu(expand_heads(k, heads)), expand_heads(v, heads)
    theta = base ** (-2 * torch.arange(heads * dim, dtype=torch.float64).view(heads, 1, 1, dim) / (heads * dim))
    rotation = torch.cos(theta * distance(nq, nk)[..., None])  # (H, Nq, Nk, D)
    weights = torch.einsum("bhid,bhjd,hijd->bhij", qf, kf, rotation)
    if causal:
        dist = distance(nq, nk)
        decayed = 1.0 if decay is None else decay[:, None, None] ** dist.clamp(min=0)
        weights = weights * visible(nq, nk, True) * decayed
    out = weights @ v  # (B, H, N, Dv); the norm runs over the token's H * Dv channels
    return out / torch.sqrt((out * out).mean(dim=(1, 3), keepdim=True) + EPS)


def diag_attention(q, k, v, *, causal, scale, block):
    heads, n = q.shape[1], q.shape[2]
    same_block = (torch.arange(n)[:, None] // block) == (torch.arange(n)[None, :] // block)
    logits = (q @ expand_heads(k, heads).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~(same_block & visible(n, n, causal)), float("-inf"))
    return torch.softmax(logits, dim=-1) @ expand_heads(v, heads)


def check(gen):
    m = attnzoo.get_method("transnormer", chunk=16)
    for causal in (False, True):
        assert_matches(m, norm_attention, gen, causal=causal, label="transnormer norm")
    layered = attnzoo.get_method("transnormer", chunk=16, decay="alibi", layer=2, num_layers=6)
    ref = lambda q, k, v, **kw: norm_attention(q, k, v, decay=rates(4, 2, 6), **kw)  # noqa: E731
    assert_matches(layered, ref, gen, causal=True, label="transnormer alibi layer 2 of 6")
    assert_matches(layered, ref, gen, causal=True, label="transnormer alibi cross", Nq=24, Nk=40)
    diag = attnzoo.get_method("transnormer", mode="diag", block_size=16)
    for causal in (False, True):
        assert_matches(diag, lambda q, k, v, **kw: diag_attention(q, k, v, block=16, **kw), gen, causal=causal,
                       label="transnormer diag")


def norm_per_head(x, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)


def same_angles_every_head(dim, base=10000.0, heads=1):
    return base ** (-2 * torch.arange(dim, dtype=torch.float32) / dim)


MUTANTS = [
    Mutant("norm-per-head", transnormer_module, "rms_normalize", norm_per_head),
    Mutant("lrpe-same-angles-every-head", transnormer_module, "lrpe_theta", same_angles_every_head),
    Mutant("no-per-layer-decay-scaling", transnormer_module, "layer_scale", lambda layer, num_layers: 1.0),
    Mutant("diag-blocks-ignored", transnormer_module.TransNormer, "_forward",
           lambda self, q, k, v, call: transnormer_module.sdpa(q, k, v, causal=call.causal, scale=call.scale)),
]

test_matches_quadratic_reference, test_mutant_is_caught = fidelity_tests(check, MUTANTS)
