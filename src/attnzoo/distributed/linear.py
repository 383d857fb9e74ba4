"""State passing for linear attention across ranks.

Each rank runs its tokens' feature maps and computes its keys' state ``S_r = sum_j lambda^(last - j)
phi(k_j)^T [v_j, 1]`` (the linear executor's ``return_state``); the states are all-gathered. Causal:
rank r starts from the prefix ``T_r = lambda^(n_{r-1}) T_{r-1} + S_{r-1}`` (a scan over the
gathered states, ``initial_state``); non-causal: from the sum of the other ranks' states.
"""

from __future__ import annotations

import torch

from ..kernels.dense import repeat_kv
from ..kernels.linear import linear_attention, state_product
from ..method import Call
from .comm import Group, all_gather, attach

# linear methods whose features are per token and position-free, so each rank computes its own
# (performer is not: its key features are stabilised by a maximum over the whole sequence)
STATE_METHODS = ("linear", "lightning")


def linear_state_attention(q, k, v, m, call: Call, group: Group, lengths: list[int]) -> torch.Tensor:
    """This rank's output (B, Hq, n_r, Dv) of linear method ``m`` over the whole sequence."""
    qf, kf = m.features(q, k, call)
    v = repeat_kv(v, kf.shape[1] // v.shape[1])
    decay = m.decay(call)
    options = {"decay": decay, "chunk": m.config.chunk, "backend": m.backend}
    _, state = state_product(qf, kf, v, causal=call.causal, append_ones=m.normalize, return_state=True, **options)
    states = all_gather(group, state)
    r = group.rank
    if call.causal:
        incoming = None
        for p in range(r):
            carry = 1.0 if decay is None else (decay.to(state.dtype) ** lengths[p])[None, :, None, None]
            incoming = states[p] if incoming is None else carry * incoming + states[p]
    else:
        incoming = sum(s for p, s in enumerate(states) if p != r)
    out = linear_attention(qf, kf, v, causal=call.causal, normalize=m.normalize, eps=m.config.eps,
                           initial_state=incoming, **options)
    return attach(m.finish(out, q, k, v, call).to(q.dtype), states)
