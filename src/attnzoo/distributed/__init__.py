"""Context-parallel attention across processes (``torch.distributed``: gloo on CPU, NCCL on GPU).

``attention(q, k, v, method, group=, causal=, layout=, strategy=)`` on each rank's shard of the
sequence: ring attention (dense), Ulysses (any method, heads split across ranks), halo exchange
(position patterns) and state passing (linear methods). ``shard`` / ``unshard`` split and join a
sequence; ``counting()`` counts the bytes a rank sends.
"""

from .api import STRATEGIES, attention, distributed_forms, shard_positions
from .comm import Traffic, counting
from .layout import LAYOUTS, positions, shard, split_lengths, unshard

__all__ = ["LAYOUTS", "STRATEGIES", "Traffic", "attention", "counting", "distributed_forms", "positions", "shard",
           "shard_positions", "split_lengths", "unshard"]
