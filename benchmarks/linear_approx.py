"""How well does each linear-family method approximate exact attention on real q/k/v? (issue 5)

    python benchmarks/linear_approx.py [--tokens 4096] [--layers 0,10,20,29] [--fit-tokens 4096]
                                       [--fit-steps 150] [--json out.json]

Captures the post-RoPE q, k, v of SmolLM2-135M (``attnzoo.models.load("smollm2-135m")``, offline)
on two disjoint stretches of ``attnzoo.eval.english_text()``: a training stretch (first half of the
text) and a held-out stretch (second half). For every method it reports the relative output error
||out - exact|| / ||exact|| on the held-out q/k/v, averaged over the chosen layers, against exact
softmax attention in the same mode: causal where the method supports causal attention, otherwise
non-causal (the table says which). The learned parts are fitted on the training stretch only:
``hedgehog`` (feature map per layer, Hedgehog's cross-entropy to the softmax weights, on 256-token
windows of the first --fit-tokens tokens) and ``random_feature`` (value matrices by ridge regression), and compared with
their untrained forms and with elu+1 (``linear``). Needs the ``[models]`` extra and the model files.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import attnzoo
from attnzoo.eval import capture_qkv, english_text
from attnzoo.kernels.dense import sdpa
from attnzoo.models import load

METHODS = [
    ("linear", {"feature_map": "elu"}),
    ("linear", {"feature_map": "relu"}),
    ("performer", {"num_features": 256}),
    ("lightning", {"decay": "alibi"}),
    ("transnormer", {"decay": "alibi"}),
    ("transnormer", {"mode": "diag", "block_size": 64}),
    ("hedgehog", {}),
    ("rala", {}),
    ("inline", {}),
    ("agent", {"num_agents": 64}),
    ("linfusion", {}),
    ("random_feature", {"num_heads": 8}),
    ("scatterbrain", {"num_features": 128, "bucket_chunk": 64}),
    ("sea", {"top_k": 256, "q_block": 64}),
]
FITTED = [("hedgehog", {}), ("random_feature", {"num_heads": 8})]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def label(name: str, cfg: dict, fitted: bool = False) -> str:
    return name + "".join(f" {k}={v}" for k, v in cfg.items()) + (" (fitted)" if fitted else "")


def fit(name: str, cfg: dict, train, fit_tokens: int, steps: int):
    """One fitted method per layer, trained on the training capture."""
    methods = {}
    for layer, c in train.items():
        m = attnzoo.get_method(name, **cfg)
        q, k, v = (t[:, :, :fit_tokens].float() for t in (c.q, c.k, c.v))
        if name == "hedgehog":
            m.fit(q, k, causal=True, scale=c.scale, steps=steps, lr=1e-2, window=256, windows_per_step=4)
        else:
            exact = sdpa(q, k, v, causal=True, scale=c.scale)
            m.fit_values(q, k, v, exact, causal=True, scale=c.scale)
        methods[layer] = m
    return methods


def evaluate(methods, held_out) -> tuple[float, bool, float]:
    """(mean relative error over layers, causal, seconds)."""
    errors, start = [], time.perf_counter()
    causal = True
    for layer, c in held_out.items():
        m = methods[layer]
        causal = m.info.causal
        q, k, v = c.q.float(), c.k.float(), c.v.float()
        with torch.no_grad():
            exact = sdpa(q, k, v, causal=causal, scale=c.scale)
            errors.append(rel_err(m(q, k, v, causal=causal, scale=c.scale), exact))
    return sum(errors) / len(errors), causal, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--layers", default="0,10,20,29")
    ap.add_argument("--fit-tokens", type=int, default=4096, help="training tokens (hedgehog: 256-token windows; random_feature: one least-squares solve)")
    ap.add_argument("--fit-steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    model, tokenizer = load("smollm2-135m")
    text = english_text()
    train = capture_qkv(model, tokenizer, text[: len(text) // 2], layers, max_tokens=args.tokens)
    held_out = capture_qkv(model, tokenizer, text[len(text) // 2:], layers, max_tokens=args.tokens)
    rows = []
    for name, cfg in METHODS:
        err, causal, secs = evaluate({layer: attnzoo.get_method(name, **cfg) for layer in layers}, held_out)
        rows.append((label(name, cfg), causal, err, secs))
        print(f"{rows[-1][0]:48s} {'causal' if causal else 'non-causal':10s} {err:8.4f}  ({secs:.1f} s)", flush=True)
    for name, cfg in FITTED:
        fitted = fit(name, cfg, train, args.fit_tokens, args.fit_steps)
        err, causal, secs = evaluate(fitted, held_out)
        rows.append((label(name, cfg, fitted=True), causal, err, secs))
        print(f"{rows[-1][0]:48s} {'causal' if causal else 'non-causal':10s} {err:8.4f}  ({secs:.1f} s)", flush=True)
    print(f"\nSmolLM2-135M, layers {layers}, {args.tokens} held-out tokens; relative output error vs exact attention")
    print("| method | mode | rel. error |\n|---|---|---|")
    for lab, causal, err, _ in rows:
        print(f"| {lab} | {'causal' if causal else 'non-causal'} | {err:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"method": r[0], "causal": r[1], "rel_error": r[2]} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
