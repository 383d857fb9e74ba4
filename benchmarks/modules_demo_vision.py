"""Demonstrations of the vision attention modules (issue 19, group B) on scikit-learn's digits.

    PYTHONPATH=src python benchmarks/modules_demo_vision.py [--seed 0]

Each module sits inside a small model trained from a fixed seed; a baseline of the same parameter
budget (within 10%, both counts printed) replaces the module by a plain fusion of the same inputs
and is trained identically. The tasks imitate each paper's setting with digits (8x8, upscaled):

- CrossScaleAttention (TOPIQ, quality assessment): regress the strength of the noise put on a
  digit's strokes while the background carries noise of an independent strength; SRCC.
- SelectiveDenseAttention (SDANet, objects of many sizes): classify a digit pasted at a random
  scale (6 to 28 pixels) and place on a 32x32 canvas from a 3-level pyramid; accuracy.
- ClassSemanticsAttention (CSA, temporal action detection): label each frame of a 24-frame digit
  "video" with the class of the action segment it lies in (or background); the semantics are a
  frozen digit classifier's log-probabilities, the features a frozen random projection of pixels;
  mean AP over the action classes.
- SentenceAttentionBlock (answer grounding): a 2x2 mosaic of four distinct digits and a question
  embedding naming one digit; answer which tile holds it; accuracy.
- TagQueryDecoder (RAM++, multi-label tagging): tag the digits present in a 2x2 mosaic; mean AP.

Baselines: CrossScaleAttention -> an MLP on the global averages of both scales; SelectiveDenseAttention
-> the FPN-style sum of the levels and a residual 1x1 MLP; ClassSemanticsAttention -> the semantics
concatenated to the features (a wider head); SentenceAttentionBlock -> the question concatenated to
every tile, a 1x1 MLP; TagQueryDecoder -> an MLP on mean- and max-pooled tokens. The question
embeddings are fixed random vectors (seed 0), one per digit. Needs scikit-learn (the ``[demo]`` extra). Each module trains for a fixed number of steps on one
thread: under a minute each on one shared core (both models of a demo together).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from attnzoo import modules

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


def load_digits_split(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's digits as ((train images (N, 1, 8, 8) in [0, 1], labels), (test images, labels)), 70/30."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("this demonstration needs scikit-learn: pip install 'attnzoo[demo]'") from e
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(labels))
    return (images[order[:cut]], labels[order[:cut]]), (images[order[cut:]], labels[order[cut:]])


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_width(build: Callable[[int], nn.Module], target: int) -> int:
    """The width w whose model build(w) (parameters growing with w) has the parameter count closest to target."""
    low, high = 1, 4096
    while low < high:  # the smallest width reaching the target
        middle = (low + high) // 2
        low, high = (middle + 1, high) if parameter_count(build(middle)) < target else (low, middle)
    return min((max(1, low - 1), low), key=lambda w: abs(parameter_count(build(w)) - target))


def train(model: nn.Module, batches: Callable[[torch.Generator], Batch], loss_fn: Callable, steps: int,
          seed: int, lr: float = 3e-3) -> None:
    """Adam for ``steps`` steps on batches drawn with a generator seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        inputs, target = batches(generator)
        loss = loss_fn(model(*inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def compare(module_model: nn.Module, build_baseline: Callable[[int], nn.Module], draw: Callable, train_split, test_split,
            loss_fn: Callable, metric: Callable[[torch.Tensor, torch.Tensor], float], steps: int, seed: int,
            batch: int = 64, test_count: int = 1000) -> tuple[nn.Module, list[float]]:
    """Train ``module_model`` and the baseline of its parameter budget (build_baseline(width)) identically on
    draw(train_split, batch, generator) batches -> (baseline, [metric of the module model, metric of the baseline]),
    both measured on one fixed draw of ``test_count`` examples from test_split."""
    baseline = build_baseline(matched_width(build_baseline, parameter_count(module_model)))
    test_inputs, test_target = draw(test_split, test_count, torch.Generator().manual_seed(seed + 1))
    metrics = []
    for model in (module_model, baseline):
        train(model, lambda g: draw(train_split, batch, g), loss_fn, steps, seed)
        with torch.no_grad():
            metrics.append(metric(model(*test_inputs), test_target))
    return baseline, metrics


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def mosaic(tiles: torch.Tensor) -> torch.Tensor:
    """tiles (B, 4, 1, 8, 8) -> a 2x2 mosaic (B, 1, 16, 16), tiles in row-major order."""
    rows = [torch.cat((tiles[:, 2 * r], tiles[:, 2 * r + 1]), dim=-1) for r in range(2)]
    return torch.cat(rows, dim=-2)


def conv_stack(channels: int, strides: tuple[int, ...]) -> nn.Sequential:
    """3x3 conv + ReLU layers from 1 channel to ``channels``, one per stride."""
    layers: list[nn.Module] = []
    for i, stride in enumerate(strides):
        layers += [nn.Conv2d(1 if i == 0 else channels, channels, 3, stride=stride, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays without ties."""
    ranks_a, ranks_b = a.argsort().argsort(), b.argsort().argsort()
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


# --- CrossScaleAttention: stroke-noise strength regression (a quality-assessment stand-in) ---------------------

class _QualityModel(nn.Module):
    """image (B, 1, 16, 16) -> a score (B,): low-level map (16x16) and high-level map (4x4) fused by ``fuse``."""

    def __init__(self, channels: int, fuse: nn.Module):
        super().__init__()
        self.low = conv_stack(channels, (1, 1))
        self.high = nn.Sequential(nn.Conv2d(channels, channels, 3, 2, 1), nn.ReLU(), nn.Conv2d(channels, channels, 3, 2, 1),
                                  nn.ReLU())
        self.fuse = fuse
        self.score = nn.Linear(channels, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        low = self.low(image)
        return self.score(self.fuse(self.high(low), low)).squeeze(-1)


class _CrossScaleFusion(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.attention = modules.create("CrossScaleAttention", dim=channels, num_heads=2, mlp_dim=2 * channels)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return self.attention(high, low).mean(dim=(2, 3))


class _PooledFusion(nn.Module):
    """Baseline: an MLP on the global averages of both maps (no top-down selection of regions)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat((high.mean(dim=(2, 3)), low.mean(dim=(2, 3))), dim=-1))


def noisy_digits(split: tuple[torch.Tensor, torch.Tensor], count: int, generator: torch.Generator) -> Batch:
    """Digits of split (images, labels) at 16x16 with noise of strength s on the strokes and b on the background -> (images, s)."""
    images = split[0]
    digits = F.interpolate(images[torch.randint(len(images), (count,), generator=generator)], size=16, mode="bilinear")
    strokes = (digits > 0.3).float()
    s, b = torch.rand(count, 1, 1, 1, generator=generator), torch.rand(count, 1, 1, 1, generator=generator)
    noise = torch.randn(digits.shape, generator=generator) * 0.5
    return (digits + noise * (s * strokes + b * (1 - strokes)),), s.flatten()


def demo_cross_scale(train_set, test_set, seed: int, steps: int) -> tuple:
    channels = 16
    module_model = _QualityModel(channels, _CrossScaleFusion(channels))
    baseline, metrics = compare(module_model, lambda h: _QualityModel(channels, _PooledFusion(channels, h)), noisy_digits,
                                train_set, test_set, F.mse_loss, lambda out, s: spearman(out.numpy(), s.numpy()), steps, seed)
    return "regress stroke-noise strength, background noise independent (SRCC)", module_model, baseline, metrics

# --- SelectiveDenseAttention: digits at many scales, classified from a pyramid --------------------------------

class _PyramidClassifier(nn.Module):
    """canvas (B, 1, 32, 32) -> logits (B, 10): three levels (16, 8, 4 pixels, ``channels`` each) fused at the finest."""

    def __init__(self, channels: int, fuse: nn.Module):
        super().__init__()
        self.stem = conv_stack(channels, (2,))
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 3, 2, 1), nn.ReLU()) for _ in range(2))
        self.fuse = fuse
        self.classify = nn.Linear(channels, 10)

    def forward(self, canvas: torch.Tensor) -> torch.Tensor:
        levels = [self.stem(canvas)]
        for down in self.down:
            levels.append(down(levels[-1]))
        return self.classify(self.fuse(levels).amax(dim=(2, 3)))


class _SumFusion(nn.Module):
    """Baseline: the levels resized to the finest and summed (an FPN-style merge), a residual 1x1 MLP."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        size = levels[0].shape[-2:]
        union = levels[0] + sum(F.interpolate(f, size=size, mode="nearest") for f in levels[1:])
        return union + self.mlp(union)


def scaled_digits(split: tuple[torch.Tensor, torch.Tensor], count: int, generator: torch.Generator) -> Batch:
    """Each digit of split (images, labels) resized to a random size in [6, 28] and pasted at a random place of a 32x32 canvas."""
    images, labels = split
    picks = torch.randint(len(images), (count,), generator=generator)
    canvas = torch.zeros(count, 1, 32, 32)
    sizes = torch.randint(6, 29, (count,), generator=generator).tolist()
    for i, (pick, size) in enumerate(zip(picks.tolist(), sizes)):
        top, left = torch.randint(0, 33 - size, (2,), generator=generator).tolist()
        canvas[i, :, top:top + size, left:left + size] = F.interpolate(images[pick:pick + 1], size=size, mode="bilinear")[0]
    return (canvas,), labels[picks]


def demo_selective_dense(train_set, test_set, seed: int, steps: int) -> tuple:
    channels = 16
    sda = modules.create("SelectiveDenseAttention", channels=channels, num_levels=3, refine_level=0, hidden_dim=8)
    module_model = _PyramidClassifier(channels, sda)
    baseline, metrics = compare(module_model, lambda h: _PyramidClassifier(channels, _SumFusion(channels, h)), scaled_digits,
                                train_set, test_set, F.cross_entropy, accuracy, steps, seed)
    return "digit at scale 6-28 px on a 32x32 canvas, 3-level pyramid (accuracy)", module_model, baseline, metrics

# --- ClassSemanticsAttention: frame labelling of digit "videos" ------------------------------------------------

FRAMES, ACTIONS = 24, 4  # actions: digits 0..3; label 0 is background, 1 + c the action of digit c


class _FrameLabeller(nn.Module):
    """(semantics (B, 10, T), features (B, 32, T)) -> frame logits (B, 1 + ACTIONS, T) through ``fuse`` and a conv head."""

    def __init__(self, fuse: nn.Module, in_channels: int, hidden: int):
        super().__init__()
        self.fuse = fuse
        self.head = nn.Sequential(nn.Conv1d(in_channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv1d(hidden, 1 + ACTIONS, 1))

    def forward(self, semantics: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.fuse(semantics, features))


class _Concatenate(nn.Module):
    """Baseline: the semantics concatenated to the features (early fusion instead of attention)."""

    def forward(self, semantics: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.cat((semantics, features), dim=1)


def frame_encoders(train_set, seed: int) -> tuple[Callable, Callable]:
    """(semantics: images -> log-probabilities (N, 10) of a logistic regression fit on the train digits,
    features: images -> ReLU of a fixed random projection (N, 32)) — both frozen."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=300, C=0.05).fit(train_set[0].flatten(1).numpy(), train_set[1].numpy())
    projection = torch.randn(64, 32, generator=torch.Generator().manual_seed(seed)) / 8

    def semantics(images: torch.Tensor) -> torch.Tensor:
        return torch.tensor(classifier.predict_log_proba(images.flatten(1).numpy()), dtype=torch.float32)

    def features(images: torch.Tensor) -> torch.Tensor:
        return torch.relu(images.flatten(1) @ projection)

    return semantics, features


def digit_videos(frames: tuple[torch.Tensor, torch.Tensor, torch.Tensor], count: int, generator: torch.Generator) -> Batch:
    """From frames (semantics (N, 10), features (N, 32), labels (N,)) of single digits: videos of FRAMES digit frames with one action segment (4 to 8 frames, digit c in 60% of them, 4..9 otherwise);
    outside it random digits (isolated 0..3 as distractors) -> ((semantics, features) (B, ., T), frame labels (B, T))."""
    semantics, features, labels = frames
    by_class = [torch.nonzero(labels == d).flatten() for d in range(10)]
    digit = torch.randint(0, 10, (count, FRAMES), generator=generator)
    frame_labels = torch.zeros(count, FRAMES, dtype=torch.long)
    for i in range(count):
        length = int(torch.randint(4, 9, (), generator=generator))
        start = int(torch.randint(0, FRAMES - length + 1, (), generator=generator))
        action = int(torch.randint(0, ACTIONS, (), generator=generator))
        shown = torch.rand(length, generator=generator) < 0.6
        digit[i, start:start + length] = torch.where(shown, action, torch.randint(ACTIONS, 10, (length,), generator=generator))
        frame_labels[i, start:start + length] = 1 + action
    picks = torch.stack([by_class[d][torch.randint(len(by_class[d]), (), generator=generator)] for d in digit.flatten()])
    return ((semantics[picks].view(count, FRAMES, -1).transpose(1, 2), features[picks].view(count, FRAMES, -1).transpose(1, 2)),
            frame_labels)


def demo_class_semantics(train_set, test_set, seed: int, steps: int) -> tuple:
    from sklearn.metrics import average_precision_score

    encode_semantics, encode_features = frame_encoders(train_set, seed)
    train_frames = (encode_semantics(train_set[0]), encode_features(train_set[0]), train_set[1])
    test_frames = (encode_semantics(test_set[0]), encode_features(test_set[0]), test_set[1])

    def frame_map(logits: torch.Tensor, labels: torch.Tensor) -> float:
        scores, truth = logits.softmax(dim=1).transpose(1, 2).flatten(0, 1).numpy(), labels.flatten().numpy()
        return float(np.mean([average_precision_score(truth == 1 + c, scores[:, 1 + c]) for c in range(ACTIONS)]))

    csa = modules.create("ClassSemanticsAttention", semantic_channels=10, channels=32, hidden_dim=8)
    module_model = _FrameLabeller(csa, 32, 16)
    baseline, metrics = compare(module_model, lambda h: _FrameLabeller(_Concatenate(), 42, h), digit_videos, train_frames,
                                test_frames, F.cross_entropy, frame_map, steps, seed, batch=32, test_count=300)
    return f"label {FRAMES}-frame digit videos: action segment or background (frame mAP)", module_model, baseline, metrics

# --- SentenceAttentionBlock: which tile of a mosaic holds the asked digit ---------------------------------------

QUESTION_DIM = 16
QUESTION_WORDS = torch.randn(10, QUESTION_DIM, generator=torch.Generator().manual_seed(0))  # a frozen "sentence encoder"


class _Grounder(nn.Module):
    """(mosaic (B, 1, 16, 16), question (B, QUESTION_DIM)) -> tile logits (B, 4)."""

    def __init__(self, channels: int, fuse: nn.Module):
        super().__init__()
        self.features = conv_stack(channels, (1, 1))
        self.fuse = fuse

    def forward(self, image: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        tiles = F.avg_pool2d(self.features(image), 8)  # (B, C, 2, 2)
        return self.fuse(tiles, question).flatten(1)


class _SentenceGate(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block = modules.create("SentenceAttentionBlock", channels=channels, sentence_dim=QUESTION_DIM, expansion=2)
        self.read = nn.Conv2d(channels, 1, 1)

    def forward(self, tiles: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        return self.read(self.block(tiles, question))


class _QuestionConcat(nn.Module):
    """Baseline: the question broadcast to every tile and concatenated, then a 1x1 conv MLP."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels + QUESTION_DIM, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, 1, 1))

    def forward(self, tiles: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat((tiles, question[:, :, None, None].expand(-1, -1, *tiles.shape[-2:])), dim=1))


def grounding_questions(split: tuple[torch.Tensor, torch.Tensor], count: int, generator: torch.Generator) -> Batch:
    """Mosaics of four distinct digits of split (images, labels), a question naming one of them (its word embedding) -> tile index."""
    images, labels = split
    by_class = [torch.nonzero(labels == d).flatten() for d in range(10)]
    digits = torch.stack([torch.randperm(10, generator=generator)[:4] for _ in range(count)])
    picks = torch.stack([by_class[d][torch.randint(len(by_class[d]), (), generator=generator)] for d in digits.flatten()])
    answer = torch.randint(0, 4, (count,), generator=generator)
    question = QUESTION_WORDS[digits[torch.arange(count), answer]]
    return (mosaic(images[picks].view(count, 4, 1, 8, 8)), question), answer


def demo_sentence_attention(train_set, test_set, seed: int, steps: int) -> tuple:
    channels = 32
    module_model = _Grounder(channels, _SentenceGate(channels))
    baseline, metrics = compare(module_model, lambda h: _Grounder(channels, _QuestionConcat(channels, h)), grounding_questions,
                                train_set, test_set, F.cross_entropy, accuracy, steps, seed)
    return "2x2 mosaic + question embedding: tile of the asked digit (accuracy)", module_model, baseline, metrics

# --- TagQueryDecoder: multi-label tagging of mosaics -----------------------------------------------------------

class _Tagger(nn.Module):
    """mosaic (B, 1, 16, 16) -> tag logits (B, 10): conv tokens (4x4, ``dim``) with their mean first, read by ``tag``."""

    def __init__(self, dim: int, tag: nn.Module):
        super().__init__()
        self.features = nn.Sequential(conv_stack(dim, (1, 2)), nn.Conv2d(dim, dim, 3, 2, 1))
        self.tag = tag

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        tokens = self.features(image).flatten(2).transpose(1, 2)
        return self.tag(torch.cat((tokens.mean(dim=1, keepdim=True), tokens), dim=1))


class _PooledTagHead(nn.Module):
    """Baseline: mean- and max-pooled tokens, an MLP to one logit per tag."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat((tokens.mean(dim=1), tokens.amax(dim=1)), dim=-1))


def tagged_mosaics(split: tuple[torch.Tensor, torch.Tensor], count: int, generator: torch.Generator) -> Batch:
    """Mosaics of four random digits of split (images, labels) (repeats allowed) -> (mosaics, which of the 10 digits appear (B, 10))."""
    images, labels = split
    picks = torch.randint(len(images), (count, 4), generator=generator)
    tags = torch.zeros(count, 10).scatter_(1, labels[picks], 1.0)
    return (mosaic(images[picks]),), tags


def demo_tag_query(train_set, test_set, seed: int, steps: int) -> tuple:
    from sklearn.metrics import average_precision_score

    dim = 32
    decoder = modules.create("TagQueryDecoder", num_tags=10, num_descriptions=2, concept_dim=dim, hidden_dim=dim,
                             num_heads=2, num_layers=1, mlp_dim=2 * dim)
    module_model = _Tagger(dim, decoder)
    baseline, metrics = compare(module_model, lambda h: _Tagger(dim, _PooledTagHead(dim, h)), tagged_mosaics, train_set,
                                test_set, F.binary_cross_entropy_with_logits,
                                lambda out, tags: float(average_precision_score(tags.numpy(), out.numpy(), average="macro")),
                                steps, seed)
    return "tag the digits present in a 2x2 mosaic, 10 tags (mAP)", module_model, baseline, metrics

DEMOS = {"CrossScaleAttention": (demo_cross_scale, 1500), "SelectiveDenseAttention": (demo_selective_dense, 2000),
         "ClassSemanticsAttention": (demo_class_semantics, 2000), "SentenceAttentionBlock": (demo_sentence_attention, 2000),
         "TagQueryDecoder": (demo_tag_query, 3000)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=sorted(DEMOS), help="run only the demo of this module")
    parser.add_argument("--steps", type=int, help="training steps (default: each demo's own)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_set, test_set = load_digits_split(args.seed)
    print(f"seed {args.seed}; digits: {len(train_set[1])} train / {len(test_set[1])} test images; one thread")
    print("module | task | params (module model / baseline) | metric module | metric baseline | steps | seconds")
    for name, (demo, steps) in DEMOS.items():
        if args.only and args.only != name:
            continue
        steps = args.steps or steps
        start = time.perf_counter()
        torch.manual_seed(args.seed)
        task, module_model, baseline, (metric_module, metric_baseline) = demo(train_set, test_set, args.seed, steps)
        seconds = time.perf_counter() - start
        print(f"{name} | {task} | {parameter_count(module_model):,} / {parameter_count(baseline):,} | "
              f"{metric_module:.3f} | {metric_baseline:.3f} | {steps} | {seconds:.0f}", flush=True)


if __name__ == "__main__":
    main()
