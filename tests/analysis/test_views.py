"""analysis.pictures (PNG) and analysis.html (offline pages), with a headless-Chromium check."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from attnzoo import InvalidArgumentError
from attnzoo.analysis import html as views
from attnzoo.analysis import pictures

TOKENS = ["<s>", "the", "cat", "sat", "down"]


def maps(rng, L=2, H=3, n=5):
    logits = torch.randn(L, 1, H, n, n, generator=rng) * 2
    return list(logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).softmax(-1))


def png_pixels(path):
    image = pytest.importorskip("matplotlib.image")
    return image.imread(path)


def test_pngs_are_written_and_not_blank(rng, tmp_path):
    pytest.importorskip("matplotlib")
    p = maps(rng)[0][0, 1]
    written = [
        pictures.attention_png(p, tmp_path / "head.png", tokens=TOKENS, title="layer 0 head 1"),
        pictures.relevance_png(torch.tensor([0.5, -0.2, 0.1, 0.9, 0.0]), tmp_path / "rel.png", tokens=TOKENS),
        pictures.grid_png(torch.rand(4, 4, generator=rng), tmp_path / "grid.png", image=torch.rand(32, 32, 3, generator=rng)),
        pictures.curves_png({"lrp": [1.0, 0.5, 0.1], "random": [1.0, 0.9, 0.8]}, tmp_path / "curves.png"),
    ]
    for path in written:
        pixels = png_pixels(path)
        assert pixels.std() > 0.01 and len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 10, path
    with pytest.raises(InvalidArgumentError, match="tokens"):
        pictures.attention_png(p, tmp_path / "x.png", tokens=TOKENS[:2])


def page_data(text: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="attention-data">(.*?)</script>', text, re.DOTALL).group(1))


def test_attention_page_is_self_contained_and_holds_the_maps(rng, tmp_path):
    m = maps(rng)
    path = views.attention_html(m, TOKENS, tmp_path / "a.html", layers=[3, 7])
    text = path.read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text and "src=" not in text
    data = page_data(text)
    assert data["layers"] == [3, 7] and data["heads"] == 3 and data["tokens"] == TOKENS
    np.testing.assert_allclose(np.array(data["attn"][1][2]), m[1][0, 2].flatten().numpy(), atol=1e-4)
    with pytest.raises(InvalidArgumentError, match="tokens"):
        views.attention_html(m, TOKENS[:4], tmp_path / "b.html")
    with pytest.raises(InvalidArgumentError, match="batch"):
        views.attention_html(m, TOKENS, tmp_path / "b.html", batch=1)


def test_token_heatmap_page(tmp_path):
    text = views.tokens_html(["a", "<b>", "c"], [1.0, -0.5, 0.0], tmp_path / "t.html", caption="why").read_text()
    assert text.count('class="tok"') == 3 and "&lt;b&gt;" in text
    assert "rgba(192, 57, 43, 1.000)" in text and "rgba(46, 134, 193, 0.500)" in text and 'title="+0"' in text
    with pytest.raises(InvalidArgumentError, match="scores"):
        views.tokens_html(["a"], [1.0, 2.0], tmp_path / "u.html")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("headless Chromium not found (Debian: apt-get install chromium); .ci/run installs it in CI")


def run_chromium(*args: str) -> str:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def edges(dom: str) -> dict[tuple[int, int], float]:
    return {(int(q), int(k)): float(w) for q, k, w in
            re.findall(r'<line class="edge" data-q="(\d+)" data-k="(\d+)"[^>]*stroke-opacity="([\d.]+)"', dom)}


def test_browser_renders_the_page_and_switches_heads(rng, tmp_path):
    m = maps(rng)
    path = views.attention_html(m, TOKENS, tmp_path / "a.html", layers=[3, 7])
    dom_a = run_chromium("--dump-dom", f"{path.as_uri()}#layer=7&head=2")
    dom_b = run_chromium("--dump-dom", f"{path.as_uri()}#layer=3&head=0")
    assert 'data-layer="7" data-head="2"' in dom_a and 'data-layer="3" data-head="0"' in dom_b
    for dom, (layer, head) in ((dom_a, (1, 2)), (dom_b, (0, 0))):
        drawn = edges(dom)
        weights = m[layer][0, head]
        expected = {(q, k) for q in range(5) for k in range(5) if weights[q, k] >= 0.005}
        assert set(drawn) == expected
        for (q, k), w in drawn.items():
            assert w == pytest.approx(weights[q, k].item(), abs=2e-3)
    assert dom_a.count('<svg width="') - 1 == 2 * 3  # the model view: one map per (layer, head), plus the head view
    shot = tmp_path / "shot.png"
    run_chromium(f"--screenshot={shot}", "--window-size=900,900", path.as_uri())
    pixels = png_pixels(shot)
    assert pixels.std() > 0.01 and len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20
