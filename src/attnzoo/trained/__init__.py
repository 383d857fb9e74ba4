"""Models this project trains itself (no pretrained weights of their kind can be reached offline).

``TRAINED`` maps a model name to the module that loads it; :func:`attnzoo.models.load` consults it. Each
module has ``load(*, dtype=None) -> (model, processor)``: the model in eval mode and the function that turns
raw data into its input.
"""

TRAINED = {"vit-digits": "attnzoo.trained.vit_digits", "dit-digits": "attnzoo.trained.dit_digits"}
