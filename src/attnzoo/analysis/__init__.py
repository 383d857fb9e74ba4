"""attnzoo.analysis: tools that read attention rather than change it.

Pure functions on attention probabilities (B?, H, Nq, Nk), one tensor per layer:
:func:`sinks` (ACT's attention sinks) and :func:`head_similarity` / :func:`layer_similarity`
(EchoAtt's similarity of maps across layers and heads).
"""

from .similarity import head_similarity, layer_similarity
from .sinks import SinkMap, sinks

__all__ = ["SinkMap", "head_similarity", "layer_similarity", "sinks"]
