"""Self-contained offline HTML views (no CDN, no external file): an attention page with a head
view and a model view, drawn as SVG by a few lines of inline JavaScript, and a static token
heatmap for attributions.

Attention page: the head view draws, for the selected layer and head, a line from each query
token (left) to each key token (right) whose opacity is the attention weight; hovering a token
keeps only its lines. The model view shows every (layer, head) map as a small heatmap; clicking
one selects it. The selection also follows the URL fragment ``#layer=L&head=H`` and is mirrored
in the ``data-layer`` / ``data-head`` attributes of ``#head-view``.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import InvalidArgumentError
from ._checks import check_layers

STYLE = """
body { font-family: sans-serif; margin: 1em; color: #222; }
h1 { font-size: 1.2em; } h2 { font-size: 1em; margin-top: 1.5em; }
#controls label { margin-right: 1em; }
#head-view text { font-size: 12px; cursor: pointer; }
#model-view { display: grid; gap: 4px; justify-content: start; }
#model-view svg { border: 1px solid #ccc; cursor: pointer; }
#model-view svg.selected { outline: 2px solid #c0392b; }
.axis { font-size: 11px; color: #666; }
"""

SCRIPT = """
const data = JSON.parse(document.getElementById('attention-data').textContent);
const n = data.tokens.length, L = data.layers.length, H = data.heads;
const SVG = 'http://www.w3.org/2000/svg';
const el = (name, attrs) => { const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; };
const layerSelect = document.getElementById('layer'), headSelect = document.getElementById('head');
data.layers.forEach((layer, i) => layerSelect.add(new Option('layer ' + layer, i)));
for (let h = 0; h < H; h++) headSelect.add(new Option('head ' + h, h));
const weight = (l, h, q, k) => data.attn[l][h][q * n + k];
let state = {layer: 0, head: 0, focus: null};

function drawHead() {
  const view = document.getElementById('head-view');
  view.setAttribute('data-layer', data.layers[state.layer]);
  view.setAttribute('data-head', state.head);
  const row = 18, width = 420, left = 120, right = width - 120;
  const svg = el('svg', {width: width, height: row * n + 10, id: 'head-svg'});
  for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) {
    const w = weight(state.layer, state.head, q, k);
    if (w < 0.005) continue;
    const shown = state.focus === null || state.focus === 'q' + q || state.focus === 'k' + k;
    svg.appendChild(el('line', {class: 'edge', 'data-q': q, 'data-k': k, x1: left, y1: row * q + 14,
      x2: right, y2: row * k + 14, stroke: '#2e86c1', 'stroke-width': 2, 'stroke-opacity': shown ? w.toFixed(3) : 0}));
  }
  data.tokens.forEach((t, i) => {
    for (const [side, x, anchor] of [['q', left - 6, 'end'], ['k', right + 6, 'start']]) {
      const label = el('text', {x: x, y: row * i + 18, 'text-anchor': anchor, class: 'token', 'data-side': side});
      label.textContent = t;
      label.addEventListener('mouseenter', () => { state.focus = side + i; drawHead(); });
      label.addEventListener('mouseleave', () => { state.focus = null; drawHead(); });
      svg.appendChild(label);
    }
  });
  view.replaceChildren(svg);
  document.querySelectorAll('#model-view svg').forEach(s =>
    s.classList.toggle('selected', +s.dataset.layer === state.layer && +s.dataset.head === state.head));
}

function select(layer, head) {
  state.layer = Math.max(0, Math.min(L - 1, layer)); state.head = Math.max(0, Math.min(H - 1, head));
  layerSelect.value = state.layer; headSelect.value = state.head; drawHead();
}

function drawModel() {
  const grid = document.getElementById('model-view');
  grid.style.gridTemplateColumns = 'auto repeat(' + H + ', auto)';
  const cell = Math.max(1, Math.floor(80 / n));
  for (let l = 0; l < L; l++) for (let h = 0; h < H; h++) {
    if (h === 0) { const label = document.createElement('div'); label.className = 'axis';
      label.textContent = 'layer ' + data.layers[l]; grid.appendChild(label); }
    const svg = el('svg', {width: cell * n, height: cell * n, 'data-layer': l, 'data-head': h});
    svg.appendChild(el('title', {})).textContent = 'layer ' + data.layers[l] + ', head ' + h;
    for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) {
      const w = weight(l, h, q, k);
      if (w < 0.01) continue;
      svg.appendChild(el('rect', {x: k * cell, y: q * cell, width: cell, height: cell, fill: '#c0392b', 'fill-opacity': w.toFixed(3)}));
    }
    svg.addEventListener('click', () => select(l, h));
    grid.appendChild(svg);
  }
}

function fromHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  const layer = data.layers.indexOf(+(p.get('layer') ?? data.layers[0]));
  select(layer < 0 ? 0 : layer, +(p.get('head') ?? 0));
}

layerSelect.addEventListener('change', () => select(+layerSelect.value, state.head));
headSelect.addEventListener('change', () => select(state.layer, +headSelect.value));
window.addEventListener('hashchange', fromHash);
drawModel();
fromHash();
"""


def _token_labels(tokens: Sequence[str]) -> list[str]:
    return [t.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\\n") for t in tokens]


def _write(path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def attention_html(maps: Sequence[torch.Tensor], tokens: Sequence[str], path, *, layers: Sequence[int] | None = None,
                   batch: int = 0, title: str = "attention") -> Path:
    """Write the attention page for per-layer probabilities ``maps`` (B?, H, N, N) of batch item
    ``batch``, labelled with ``tokens`` (N) and model layer indices ``layers`` (default 0..L-1).
    Returns the path. The page has no external dependency and renders offline."""
    probs = check_layers("maps", maps)
    b, heads, nq, nk = probs[0].shape
    if nq != nk or len(tokens) != nk:
        raise InvalidArgumentError("tokens", f"one token per position of the (N, N) maps (N = {nk})", len(tokens))
    if not 0 <= batch < b:
        raise InvalidArgumentError("batch", f"a batch index in [0, {b - 1}]", batch)
    layers = list(range(len(probs))) if layers is None else [int(i) for i in layers]
    if len(layers) != len(probs):
        raise InvalidArgumentError("layers", f"one index per map ({len(probs)})", len(layers))
    attn = [[[round(float(w), 4) for w in p[batch, h].flatten().tolist()] for h in range(heads)] for p in probs]
    payload = json.dumps({"tokens": _token_labels(tokens), "layers": layers, "heads": heads, "attn": attn}).replace("</", "<\\/")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<h2>Head view</h2>
<div id="controls"><label>Layer <select id="layer"></select></label><label>Head <select id="head"></select></label>
<span class="axis">queries left, keys right; hover a token to isolate its lines</span></div>
<div id="head-view"></div>
<h2>Model view</h2>
<div class="axis">rows: layers, columns: heads 0..H-1; click a map to show it above</div>
<div id="model-view"></div>
<script type="application/json" id="attention-data">{payload}</script>
<script>{SCRIPT}</script>
</body></html>
"""
    return _write(path, page)


def _colour(score: float, scale: float) -> str:
    alpha = min(1.0, abs(score) / scale) if scale > 0 else 0.0
    return f"rgba(192, 57, 43, {alpha:.3f})" if score >= 0 else f"rgba(46, 134, 193, {alpha:.3f})"


def tokens_html(tokens: Sequence[str], scores: Sequence[float] | torch.Tensor, path, *, title: str = "attribution",
                caption: str = "") -> Path:
    """Write a static page that shades each token by its score (red for, blue against; the
    strongest score is full colour), the value in each token's tooltip. Returns the path."""
    values = [float(s) for s in (scores.tolist() if isinstance(scores, torch.Tensor) else scores)]
    if len(values) != len(tokens):
        raise InvalidArgumentError("scores", f"one score per token ({len(tokens)} tokens)", len(values))
    scale = max((abs(v) for v in values), default=0.0)
    spans = "".join(f'<span class="tok" title="{v:+.4g}" style="background:{_colour(v, scale)}">{html.escape(t)}</span>'
                    for t, v in zip(_token_labels(tokens), values))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body {{ font-family: sans-serif; margin: 1em; }} .tok {{ padding: 2px 1px; margin: 1px; border-radius: 3px;
white-space: pre; line-height: 2em; }}</style></head>
<body><h1>{html.escape(title)}</h1><p>{html.escape(caption)}</p><div id="tokens">{spans}</div></body></html>
"""
    return _write(path, page)
