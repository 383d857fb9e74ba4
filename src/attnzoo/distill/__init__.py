"""``attnzoo.distill``: train the small learned part of a method (a gate, a feature map, a router, a
predictor) against a frozen model's own attention, and load it back with ``attnzoo.patch(model, NAME,
weights=DIR)``. See :func:`distill` (the loop), :mod:`.recipes` (what each method trains on) and
:mod:`.checkpoint` (the files)."""

from .harness import DistillRun, batch_indices, distill, text_examples
from .recipes import RECIPES, Recipe, get_recipe
from .targets import QKV, Signals, Target, target_for

__all__ = ["QKV", "RECIPES", "DistillRun", "Recipe", "Signals", "Target", "batch_indices", "distill", "get_recipe",
           "target_for", "text_examples"]
