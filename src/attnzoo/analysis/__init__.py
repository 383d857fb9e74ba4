"""attnzoo.analysis: tools that read attention rather than change it.

- :func:`record`: one forward pass of a transformers model (patched or not), its attention
  probabilities per layer (B, H, N, N), the tokens and, on request, the post-RoPE q, k, v;
- pure functions on per-layer probabilities: :func:`sinks` (ACT's attention sinks),
  :func:`head_similarity` / :func:`layer_similarity` (EchoAtt), :func:`rollout`,
  :func:`attention_flow` and :func:`regularized_flow` (VL-SAM);
- :func:`lrp` (AttnLRP relevance for llama- and bert-family models) and :func:`sr_map` (the
  salient relevance map built from it), :func:`normgrad` (NormGrad saliency for CNN and ViT layers);
- :func:`rank` (RALA's KV-buffer / output rank analysis), :func:`token_importance` (RSQ's
  attention concentration), :func:`verbalize` (templated text from token attributions);
- views: PNGs (:mod:`.pictures`, matplotlib), offline HTML pages (:mod:`.html`), deletion curves
  (:mod:`.faithfulness`); ``attnzoo analyze`` runs any tool from the command line (:mod:`.cli`).
"""

from .faithfulness import deletion_area, deletion_curve, deletion_order
from .flow import attention_flow, fuse_heads, max_flow, regularized_flow, rollout
from .html import attention_html, tokens_html
from .lrp import Relevance, lrp
from .normgrad import normgrad
from .pictures import attention_png, curves_png, grid_png, relevance_png
from .rank import RankReport, effective_rank, numerical_rank, rank
from .record import Recording, record, to_image_grid
from .similarity import head_similarity, layer_similarity
from .sinks import SinkMap, sinks
from .sr_map import sr_map
from .token_importance import token_importance
from .verbalize import verbalize

__all__ = [
    "RankReport",
    "Recording",
    "Relevance",
    "SinkMap",
    "attention_flow",
    "attention_html",
    "attention_png",
    "curves_png",
    "deletion_area",
    "deletion_curve",
    "deletion_order",
    "effective_rank",
    "fuse_heads",
    "grid_png",
    "head_similarity",
    "layer_similarity",
    "lrp",
    "max_flow",
    "normgrad",
    "numerical_rank",
    "rank",
    "record",
    "regularized_flow",
    "relevance_png",
    "rollout",
    "sinks",
    "sr_map",
    "to_image_grid",
    "token_importance",
    "tokens_html",
    "verbalize",
]
