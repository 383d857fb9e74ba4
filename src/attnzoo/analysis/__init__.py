"""attnzoo.analysis: tools that read attention rather than change it.

- :func:`record`: one forward pass of a transformers model (patched or not), its attention
  probabilities per layer (B, H, N, N), the tokens and, on request, the post-RoPE q, k, v;
- pure functions on per-layer probabilities: :func:`sinks` (ACT's attention sinks),
  :func:`head_similarity` / :func:`layer_similarity` (EchoAtt), :func:`rollout`,
  :func:`attention_flow` and :func:`regularized_flow` (VL-SAM).
"""

from .flow import attention_flow, fuse_heads, max_flow, regularized_flow, rollout
from .record import Recording, record
from .similarity import head_similarity, layer_similarity
from .sinks import SinkMap, sinks

__all__ = ["Recording", "SinkMap", "attention_flow", "fuse_heads", "head_similarity", "layer_similarity", "max_flow", "record",
           "regularized_flow", "rollout", "sinks"]
