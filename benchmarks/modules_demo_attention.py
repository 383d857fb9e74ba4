"""Group D's modules in small character language models, each against a dense baseline of the same
parameter budget, on text that CPython ships (no download).

    python benchmarks/modules_demo_attention.py

Data: "docs" is the Python documentation of ``pydoc_data.topics``; "code" is the source of a few
standard-library modules (argparse, textwrap, functools, dataclasses, enum). Characters outside
printable ASCII map to one placeholder; each source's last 10% is its test split.

- RCMHA: 2-layer pre-norm char LM (dim 64, 4 heads, context 64) on docs; the baseline is the same
  model with dense multi-head attention (``attnzoo.nn.Attention``) and learned absolute position
  embeddings, whose (context x dim) table matches RCMHA's relative projection W_R in size.
  Metric: test perplexity (lower is better).
- AttentionExperts (BAM): a dense char LM is trained on the mix of both sources, branched into two
  copies trained on docs and on code, then merged: each layer's attention becomes
  ``AttentionExperts.from_dense([docs layer, code layer])``, every other parameter is the copies'
  mean, and the merged model trains on the mix. The baseline is one dense model whose attention has
  twice the heads (the parameters of two experts), trained from the same seed model on the mix for
  as many steps of the same batch size as BAM's three stages together. Metric: test perplexity on
  the mix (docs / code). Router separation: how well the router's weight on the docs expert tells
  docs tokens from code tokens on the test split, as ROC AUC per token and per window (gates
  averaged over the window), and the fraction of tokens routed mostly to their own source's
  expert; before and after the merged model's training.

One thread, fixed seed; every model and its baseline see the same batches.
"""

from __future__ import annotations

import copy
import math
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from attnzoo.modules import create
from attnzoo.modules.attention_experts import AttentionExperts
from attnzoo.nn import Attention

SEED = 0
DIM, HEADS, LAYERS, CONTEXT, BATCH = 64, 4, 2, 64, 32
LR = 3e-3
RCMHA_STEPS = 600
BAM_SEED_STEPS, BAM_BRANCH_STEPS, BAM_MERGED_STEPS = 150, 200, 200
TEST_WINDOWS = 192
CODE_MODULES = ("argparse", "textwrap", "functools", "dataclasses", "enum")
VOCAB = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
UNKNOWN = len(VOCAB)  # the placeholder id of every other character


def encode(text: str) -> torch.Tensor:
    """Character ids, (len(text),) int64."""
    index = {c: i for i, c in enumerate(VOCAB)}
    return torch.tensor([index.get(c, UNKNOWN) for c in text], dtype=torch.long)


def load_sources() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"docs": (train ids, test ids), "code": (train ids, test ids)}."""
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = {"docs": "".join(topics[key] for key in sorted(topics)),
             "code": "".join((stdlib / f"{name}.py").read_text(encoding="utf-8") for name in CODE_MODULES)}
    sources = {}
    for name, text in texts.items():
        ids = encode(text)
        cut = int(0.9 * len(ids))
        sources[name] = (ids[:cut], ids[cut:])
    return sources


def sample_windows(ids: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """count random windows of CONTEXT + 1 ids, (count, CONTEXT + 1)."""
    starts = torch.randint(0, len(ids) - CONTEXT - 1, (count,), generator=generator)
    return torch.stack([ids[s:s + CONTEXT + 1] for s in starts.tolist()])


def test_windows(ids: torch.Tensor) -> torch.Tensor:
    """Up to TEST_WINDOWS non-overlapping windows of CONTEXT + 1 ids, evenly spread over ids."""
    stride = max(CONTEXT + 1, (len(ids) - CONTEXT - 1) // TEST_WINDOWS)
    starts = range(0, len(ids) - CONTEXT - 1, stride)
    return torch.stack([ids[s:s + CONTEXT + 1] for s in starts][:TEST_WINDOWS])


class Block(nn.Module):
    """Pre-norm residual block, x (B, N, DIM) -> (B, N, DIM): token mixer, then a 4x MLP."""

    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.mixer = mixer
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CharLM(nn.Module):
    """ids (B, N) -> next-character logits (B, N, vocab); ``make_mixer()`` gives each layer's attention,
    ``absolute_positions`` adds a learned (CONTEXT, DIM) position table to the embeddings."""

    def __init__(self, make_mixer: Callable[[], nn.Module], absolute_positions: bool):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB) + 1, DIM)
        self.positions = nn.Parameter(0.02 * torch.randn(CONTEXT, DIM)) if absolute_positions else None
        self.blocks = nn.ModuleList(Block(make_mixer()) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, len(VOCAB) + 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.positions is not None:
            x = x + self.positions[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train(model: nn.Module, batches: Callable[[torch.Generator], torch.Tensor], steps: int, seed: int) -> None:
    """AdamW with linear warm-up and cosine decay; the batches come from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    for _ in range(steps):
        windows = batches(generator)
        loss = F.cross_entropy(model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """exp of the mean next-character cross-entropy over every position of the windows."""
    model.eval()
    loss = sum(F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
               for chunk in windows.split(64))
    return math.exp(loss.item() / (windows.shape[0] * CONTEXT))


def rcmha_row(sources) -> tuple:
    docs_train, docs_test = sources["docs"]
    batches = lambda g: sample_windows(docs_train, BATCH, g)
    start = time.perf_counter()
    torch.manual_seed(SEED)
    model = CharLM(lambda: create("RCMHA", dim=DIM, num_heads=HEADS, kernel_size=3, pos_dim=CONTEXT, causal=True),
                   absolute_positions=False)
    torch.manual_seed(SEED)
    baseline = CharLM(lambda: Attention(DIM, HEADS, causal=True), absolute_positions=True)
    for m in (model, baseline):
        train(m, batches, RCMHA_STEPS, SEED)
    test = test_windows(docs_test)
    return ("RCMHA", "char LM on pydoc topics, test perplexity", count(model), count(baseline),
            f"{perplexity(model, test):.3f}", f"{perplexity(baseline, test):.3f} (dense + learned abs. positions)",
            f"{RCMHA_STEPS}", time.perf_counter() - start), []


def merge(docs_model: CharLM, code_model: CharLM) -> CharLM:
    """BAM's upcycling: each layer's attention becomes AttentionExperts over (docs, code) layers; the rest is their mean."""
    merged = copy.deepcopy(docs_model)
    for i, block in enumerate(merged.blocks):
        block.mixer = AttentionExperts.from_dense([docs_model.blocks[i].mixer, code_model.blocks[i].mixer])
    docs_state, code_state = docs_model.state_dict(), code_model.state_dict()
    with torch.no_grad():
        for name, tensor in merged.state_dict().items():
            if ".mixer." not in name:
                tensor.copy_((docs_state[name] + code_state[name]) / 2)
    return merged


@torch.no_grad()
def router_separation(model: CharLM, docs: torch.Tensor, code: torch.Tensor) -> list[str]:
    """Per layer: ROC AUC of the docs expert's gate, docs vs code test tokens (per token and per window),
    and the fraction of tokens whose larger gate is their own source's expert (expert 0 docs, 1 code)."""
    inputs: list[torch.Tensor] = []
    hooks = [block.mixer.register_forward_hook(lambda _m, args, _out: inputs.append(args[0])) for block in model.blocks]
    model.eval()
    gates = {}
    for name, windows in (("docs", docs), ("code", code)):
        inputs.clear()
        model(windows[:, :-1])
        gates[name] = [block.mixer.gates(x)[..., 0] for block, x in zip(model.blocks, inputs)]  # (W, N) each
    for hook in hooks:
        hook.remove()
    lines = []
    for layer in range(LAYERS):
        docs_gate, code_gate = gates["docs"][layer], gates["code"][layer]
        token_auc = roc_auc_score([1] * docs_gate.numel() + [0] * code_gate.numel(),
                                  torch.cat((docs_gate.flatten(), code_gate.flatten())).tolist())
        window_auc = roc_auc_score([1] * len(docs_gate) + [0] * len(code_gate),
                                   torch.cat((docs_gate.mean(1), code_gate.mean(1))).tolist())
        own = ((docs_gate > 0.5).sum() + (code_gate < 0.5).sum()).item() / (docs_gate.numel() + code_gate.numel())
        lines.append(f"layer {layer}: token AUC {token_auc:.3f}, window AUC {window_auc:.3f}, routed to own expert {own:.1%}")
    return lines


def attention_experts_row(sources) -> tuple:
    (docs_train, docs_test), (code_train, code_test) = sources["docs"], sources["code"]
    mix = lambda g: torch.cat((sample_windows(docs_train, BATCH // 2, g), sample_windows(code_train, BATCH // 2, g)))
    only = {name: (lambda g, ids=ids: sample_windows(ids, BATCH, g)) for name, ids in (("docs", docs_train), ("code", code_train))}
    docs, code = test_windows(docs_test), test_windows(code_test)
    start = time.perf_counter()
    torch.manual_seed(SEED)
    seed_model = CharLM(lambda: Attention(DIM, HEADS, causal=True), absolute_positions=True)
    train(seed_model, mix, BAM_SEED_STEPS, SEED)
    branches = {}
    for offset, name in enumerate(("docs", "code"), start=1):
        branches[name] = copy.deepcopy(seed_model)
        train(branches[name], only[name], BAM_BRANCH_STEPS, SEED + offset)
    torch.manual_seed(SEED)
    merged = merge(branches["docs"], branches["code"])
    before = router_separation(merged, docs, code)
    train(merged, mix, BAM_MERGED_STEPS, SEED + 3)
    after = router_separation(merged, docs, code)

    # a dense model of BAM's budget (twice the heads) cannot start from the seed model: it trains from
    # scratch for as many steps as BAM's three stages together
    torch.manual_seed(SEED)
    baseline = CharLM(lambda: Attention(DIM, 2 * HEADS, head_dim=DIM // HEADS, causal=True), absolute_positions=True)
    total = BAM_SEED_STEPS + 2 * BAM_BRANCH_STEPS + BAM_MERGED_STEPS
    train(baseline, mix, total, SEED)
    both = torch.cat((docs, code))

    def metric(model: CharLM) -> str:
        return f"{perplexity(model, both):.3f} ({perplexity(model, docs):.3f} / {perplexity(model, code):.3f})"

    notes = ([f"AttentionExperts router before the merged training (random router): {line}" for line in before]
             + [f"AttentionExperts router after {BAM_MERGED_STEPS} merged steps: {line}" for line in after]
             + [f"AttentionExperts branches: docs model {metric(branches['docs'])}, code model {metric(branches['code'])}"])
    return ("AttentionExperts", "char LM on docs + code (2 experts), test perplexity mix (docs / code)",
            count(merged), count(baseline), metric(merged), metric(baseline) + " (dense, 2x heads)",
            f"{BAM_SEED_STEPS} + 2x{BAM_BRANCH_STEPS} + {BAM_MERGED_STEPS} / {total}",
            time.perf_counter() - start), notes


def main() -> None:
    torch.set_num_threads(1)
    print(f"seed {SEED}; dim {DIM}, {HEADS} heads, {LAYERS} layers, context {CONTEXT}, batch {BATCH}, AdamW lr {LR}, 1 thread")
    sources = load_sources()
    print("data: " + ", ".join(f"{name} {len(train):,} train / {len(test):,} test chars" for name, (train, test) in sources.items()))
    print("| module | task | params (module model / baseline) | metric module | metric baseline | steps | seconds |")
    print("|---|---|---|---|---|---|---|")
    all_notes = []
    for row in (rcmha_row, attention_experts_row):
        (name, task, params, baseline_params, metric, baseline_metric, steps, seconds), notes = row(sources)
        print(f"| {name} | {task} | {params:,} / {baseline_params:,} ({params / baseline_params - 1:+.1%}) | {metric} | "
              f"{baseline_metric} | {steps} | {seconds:.1f} |", flush=True)
        all_notes += notes
    for note in all_notes:
        print(note)


if __name__ == "__main__":
    main()
