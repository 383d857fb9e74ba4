"""Small demonstrations of the group C (sets) modules against same-budget baselines, on scikit-learn's digits.

    python benchmarks/modules_demo_sets.py [--seed 0]

Needs scikit-learn (extra ``[demo]``). Each module trains inside a small model, and a baseline of the
same parameter budget (within 10%) trains the same steps on the same data from the same seed:

- ACMIL: bags of 12 digits, positive iff the bag holds a 9; bag AUC, and the instance AUC of the
  attention scores (instances of positive test bags, label "is a 9") for ACMIL trained with and without
  stochastic top-K masking. Baseline: gated-attention ABMIL (one branch, no masking, the paper's baseline).
- DynamicSubspaceLearner: metric learning on digits 0-4 (normalised-softmax proxies), one learner grown
  into two halfway; Recall@1 retrieval on the unseen digits 5-9. Baseline: the same CNN, global average
  pooling and one L2-normalised linear embedding (no attention map, no learners), wider to match.
- DecoupledTargetAttention: "users" who like two digit classes; items are digit images, history of up to
  40 items (mask), target clicked iff its class is liked; test AUC. Baseline: the same target attention
  with one shared embedding table (attention = representation), wider to match (the paper's comparison).
- PLaplacianAdapter: a one-block transformer over 2x2 patches pre-trained on digits 0-4, frozen, then
  adapted with 10 examples per class to digits 5-9; test accuracy. Baseline: a bottleneck adapter
  (down, GELU, up) in the same place; the counts are the trainable parameters (adapter + new head).
- ObjectScanpathTransformer: 3x3 mosaics of digits, objects in random order; the "gaze" visits the tiles
  in raster order until it reaches the target digit, then ends; teacher-forced next-fixation accuracy on
  test scenes. Baseline: the same model with a learned linear map of the (x, y) centre instead of the
  object positional encoding (an ablation of the paper's contribution, same budget).

Prints one line per module: module | task | params (module model / baseline) | metric module | metric
baseline | steps | seconds (both arms together).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo import modules
from attnzoo.modules.object_scanpath_transformer import ObjectScanpathTransformer

try:
    from sklearn.datasets import load_digits
    from sklearn.metrics import roc_auc_score
except ImportError as error:  # pragma: no cover - the demo's only optional dependency
    raise SystemExit("this demo needs scikit-learn: pip install 'attnzoo[demo]'") from error


def count(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def matched(build, budget: int, widths) -> nn.Module:
    """The model build(width) whose parameter count is closest to budget (must be within 10%)."""
    model = min((build(w) for w in widths), key=lambda m: abs(count(m, True) - budget))
    if abs(count(model, True) - budget) > 0.1 * budget:
        raise RuntimeError(f"no width matches {budget} parameters within 10% (closest {count(model, True)})")
    return model


def fit(model: nn.Module, loss_of, steps: int, lr: float) -> None:
    """Adam on the trainable parameters for ``steps`` steps of ``loss_of(step)``."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        loss_of(step).backward()
        optimizer.step()
    model.eval()


class Digits:
    """Digits 8x8 scaled to [0, 1], split in half: images (n, 8, 8), labels (n,)."""

    def __init__(self, seed: int):
        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32) / 16.0
        labels = torch.tensor(data.target)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        half = len(order) // 2
        self.train = images[order[:half]], labels[order[:half]]
        self.test = images[order[half:]], labels[order[half:]]


# ---------------------------------------------------------------- ACMIL: bags of digits


def make_bags(images, labels, count_: int, size: int, positive_digit: int, g: torch.Generator):
    """count_ bags of `size` flattened digits (half positive: 1-3 copies of positive_digit) -> bags, bag labels, instance labels."""
    positives = (labels == positive_digit).nonzero().flatten()
    negatives = (labels != positive_digit).nonzero().flatten()
    chosen = negatives[torch.randint(len(negatives), (count_, size), generator=g)]
    bag_labels = torch.rand(count_, generator=g) < 0.5
    for b in bag_labels.nonzero().flatten():
        k = int(torch.randint(1, 4, (), generator=g))
        where = torch.randperm(size, generator=g)[:k]
        chosen[b, where] = positives[torch.randint(len(positives), (k,), generator=g)]
    return images[chosen].flatten(2), bag_labels.long(), labels[chosen] == positive_digit


def demo_acmil(digits: Digits, seed: int):
    g = torch.Generator().manual_seed(seed)
    train = make_bags(*digits.train, 600, 12, 9, g)
    test = make_bags(*digits.test, 400, 12, 9, g)
    steps, batch = 1500, 16
    order = torch.randint(600, (steps, batch), generator=g)

    def run(model):
        fit(model, lambda s: model.loss(model(train[0][order[s]]), train[1][order[s]]), steps, 1e-3)
        with torch.no_grad():
            out = model(test[0])
        bag_auc = roc_auc_score(test[1], out.bag_logits.softmax(-1)[:, 1])
        positive = test[1] == 1
        instance_auc = roc_auc_score(test[2][positive].flatten(), out.instance_scores[positive].flatten())
        return bag_auc, instance_auc

    torch.manual_seed(seed)
    acmil = modules.create("ACMIL", in_dim=64, hidden_dim=32, attention_dim=32, num_branches=5, top_k=10, mask_prob=0.6)
    budget = count(acmil)
    torch.manual_seed(seed)
    unmasked = modules.create("ACMIL", in_dim=64, hidden_dim=32, attention_dim=32, num_branches=5, top_k=0, mask_prob=0.0)
    torch.manual_seed(seed)
    abmil = matched(lambda w: modules.create("ACMIL", in_dim=64, hidden_dim=w, attention_dim=w, num_branches=1, top_k=0,
                                             mask_prob=0.0), budget, range(16, 64))
    start = time.perf_counter()
    (bag_m, inst_m), (bag_u, inst_u), (bag_b, inst_b) = run(acmil), run(unmasked), run(abmil)
    seconds = time.perf_counter() - start
    task = "MIL bags of 12 digits, positive iff a 9; baseline ABMIL"
    return [("ACMIL (masking 0.6)", task, budget, count(abmil), {"bag_AUC": bag_m, "inst_AUC": inst_m},
             {"bag_AUC": bag_b, "inst_AUC": inst_b}, steps, seconds),
            ("ACMIL (no masking)", task, count(unmasked), count(abmil), {"bag_AUC": bag_u, "inst_AUC": inst_u},
             {}, steps, 0.0)]


# ------------------------------------------------ DynamicSubspaceLearner: retrieval on unseen digits


def backbone(width: int) -> nn.Sequential:
    """(B, 1, 16, 16) -> (B, width, 8, 8)."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, width, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2))


class PooledEmbedding(nn.Module):
    """The baseline head: global average pooling and one L2-normalised linear embedding."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.embedding = nn.Linear(width, dim)

    def forward(self, features):
        return F.normalize(self.embedding(features.mean(dim=(2, 3))), dim=-1)


class ProxyModel(nn.Module):
    """Backbone + embedding head + one learned proxy per training class (normalised softmax, scale 16)."""

    def __init__(self, width: int, head: nn.Module, dim: int, classes: int = 5):
        super().__init__()
        self.features, self.head = backbone(width), head
        self.proxies = nn.Parameter(torch.randn(classes, dim))

    def head_output(self, images):
        return self.head(self.features(F.interpolate(images[:, None], size=16, mode="bilinear", align_corners=False)))

    def embed(self, images):
        return F.normalize(self.head_output(images), dim=-1)  # a grown DSL's unit-norm learners, normalised together

    def loss(self, images, labels, embeddings=None):
        e = self.embed(images) if embeddings is None else embeddings
        return F.cross_entropy(16 * e @ F.normalize(self.proxies, dim=-1).T, labels)


def recall_at_1(embeddings, labels) -> float:
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-math.inf)
    return (labels[similarity.argmax(dim=1)] == labels).float().mean().item()


def demo_dsl(digits: Digits, seed: int):
    images, labels = digits.train
    seen = labels < 5
    images, labels = images[seen], labels[seen]
    test_images, test_labels = digits.test
    unseen = test_labels >= 5
    test_images, test_labels = test_images[unseen], test_labels[unseen]
    steps, batch, dim = 300, 64, 32
    order = torch.randint(len(labels), (steps, batch), generator=torch.Generator().manual_seed(seed))

    def run(model, grow_at=None):
        def loss_of(step):
            x, y = images[order[step]], labels[order[step]]
            if step == grow_at:  # Taylor importance of the embedding neurons on this batch, then grow
                raw = model.head_output(x)
                raw.retain_grad()
                model.loss(x, y, F.normalize(raw, dim=-1)).backward()
                model.head.grow(model.head.taylor_scores(raw.detach(), raw.grad))
                model.zero_grad()
            return model.loss(x, y)

        fit(model, loss_of, steps, 2e-3)
        with torch.no_grad():
            return recall_at_1(model.embed(test_images), test_labels)

    torch.manual_seed(seed)
    dsl = ProxyModel(32, modules.create("DynamicSubspaceLearner", in_channels=32, embedding_dim=dim, num_learners=1), dim)
    torch.manual_seed(seed)
    base = matched(lambda w: ProxyModel(w, PooledEmbedding(w, dim), dim), count(dsl), range(32, 64))
    start = time.perf_counter()
    r_dsl = run(dsl, grow_at=steps // 2)
    r_base = run(base)
    seconds = time.perf_counter() - start
    task = f"metric learning 0-4, retrieval on unseen 5-9, 1->{dsl.head.num_learners} learners; baseline pooled embedding"
    return [("DynamicSubspaceLearner", task, count(dsl), count(base), {"R@1": r_dsl}, {"R@1": r_base}, steps, seconds)]


# --------------------------------------------- DecoupledTargetAttention: users who like two digits


def make_users(labels, count_: int, length: int, g: torch.Generator):
    """Users who like 2 of the 10 classes; items are digit indices -> target, history, mask, clicked."""
    by_class = [(labels == c).nonzero().flatten() for c in range(10)]
    liked = torch.rand(count_, 10, generator=g).argsort(dim=-1)[:, :2]  # (U, 2)
    disliked = torch.rand(count_, 10, generator=g).argsort(dim=-1)
    history_class = torch.where(torch.rand(count_, length, generator=g) < 0.7,
                                liked.gather(1, torch.randint(2, (count_, length), generator=g)),
                                torch.randint(10, (count_, length), generator=g))
    clicked = torch.rand(count_, generator=g) < 0.5
    first_disliked = disliked.masked_fill((disliked[..., None] == liked[:, None]).any(-1), 99).min(dim=-1).values
    target_class = torch.where(clicked, liked[:, 0], first_disliked)

    def item_of(classes):
        flat = classes.flatten()
        picks = torch.stack([by_class[c][torch.randint(len(by_class[c]), (), generator=g)] for c in flat.tolist()])
        return picks.view(classes.shape)

    lengths = torch.randint(length // 2, length + 1, (count_, 1), generator=g)
    mask = torch.arange(length) < lengths
    return item_of(target_class), item_of(history_class), mask, clicked.float()


def demo_dare(digits: Digits, seed: int):
    labels = digits.train[1][:300]  # 300 items: digit images of the train split, class = digit
    g = torch.Generator().manual_seed(seed)
    train = make_users(labels, 12000, 40, g)
    test = make_users(labels, 3000, 40, g)
    steps, batch = 1000, 128
    order = torch.randint(12000, (steps, batch), generator=g)

    def run(model):
        def loss_of(step):
            i = order[step]
            return F.binary_cross_entropy_with_logits(model(train[0][i], train[1][i], train[2][i]), train[3][i])

        fit(model, loss_of, steps, 3e-3)
        with torch.no_grad():
            return roc_auc_score(test[3], model(test[0], test[1], test[2]))

    def shared(width):
        model = modules.create("DecoupledTargetAttention", num_items=300, attention_dim=width, representation_dim=width,
                               mlp_dims=(32, 16))
        model.item_attention.weight = model.item_representation.weight  # one table for both roles
        return model

    torch.manual_seed(seed)
    dare = modules.create("DecoupledTargetAttention", num_items=300, attention_dim=16, representation_dim=16, mlp_dims=(32, 16))
    torch.manual_seed(seed)
    base = matched(shared, count(dare), range(16, 48))
    start = time.perf_counter()
    auc_dare, auc_base = run(dare), run(base)
    seconds = time.perf_counter() - start
    task = f"click iff target digit class liked, history <= 40; 16+16 dims vs one shared {base.attention_width}-dim table"
    return [("DecoupledTargetAttention", task, count(dare), count(base), {"AUC": auc_dare}, {"AUC": auc_base},
             steps, seconds)]


# ----------------------------------------- PLaplacianAdapter: adapt a frozen digit transformer


class BottleneckAdapter(nn.Module):
    """hidden (B, N, dim) -> hidden + up(GELU(down(hidden))): the baseline adapter (queries etc. ignored)."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.down, self.up = nn.Linear(dim, width), nn.Linear(width, dim)

    def forward(self, hidden, queries, values, attention):
        return hidden + self.up(F.gelu(self.down(hidden)))


class PatchTransformer(nn.Module):
    """digits (B, 8, 8) -> logits: 16 patches of 2x2, one pre-norm block whose attention output passes an adapter."""

    def __init__(self, dim: int = 32, heads: int = 2, classes: int = 5):
        super().__init__()
        self.heads = heads
        self.patch, self.position = nn.Linear(4, dim), nn.Parameter(torch.randn(16, dim) * 0.02)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)
        self.adapter = None

    def forward(self, images):
        patches = images.unfold(1, 2, 2).unfold(2, 2, 2).flatten(3).flatten(1, 2)  # (B, 16, 4)
        x = self.patch(patches) + self.position
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        probs = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // self.heads), dim=-1)
        hidden = self.proj((probs @ split(v)).transpose(1, 2).flatten(2))
        if self.adapter is not None:
            hidden = self.adapter(hidden, q, v, probs)
        x = x + hidden
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm3(x).mean(dim=1))


def demo_padapter(digits: Digits, seed: int):
    images, labels = digits.train
    g = torch.Generator().manual_seed(seed)
    old = (labels < 5).nonzero().flatten()
    pre_steps, steps = 400, 300
    pre_order = old[torch.randint(len(old), (pre_steps, 64), generator=g)]
    shots = torch.cat([(labels == c).nonzero().flatten()[:10] for c in range(5, 10)])  # 10 per new class
    test_images, test_labels = digits.test
    new_test = test_labels >= 5
    torch.manual_seed(seed)
    host = PatchTransformer()
    start = time.perf_counter()
    fit(host, lambda s: F.cross_entropy(host(images[pre_order[s]]), labels[pre_order[s]]), pre_steps, 3e-3)
    host.requires_grad_(False)

    def adapted(adapter):
        torch.manual_seed(seed)
        model = copy.deepcopy(host)
        model.head, model.adapter = nn.Linear(32, 5), adapter
        return model

    def run(model):
        fit(model, lambda s: F.cross_entropy(model(images[shots]), labels[shots] - 5), steps, 3e-3)
        with torch.no_grad():
            return (model(test_images[new_test]).argmax(-1) == test_labels[new_test] - 5).float().mean().item()

    torch.manual_seed(seed)
    p_model = adapted(modules.create("PLaplacianAdapter", dim=32, num_heads=2, reduction=4, p=1.25, mu=0.1))
    base = matched(lambda w: adapted(BottleneckAdapter(32, w)), count(p_model, True), range(4, 24))
    acc_p, acc_b = run(p_model), run(base)
    seconds = time.perf_counter() - start
    task = "frozen ViT on 0-4, 10-shot adapt to 5-9 (trainable params); baseline bottleneck adapter"
    return [("PLaplacianAdapter", task, count(p_model, True), count(base, True),
             {"acc": acc_p, "learned_p": p_model.adapter.p.item()}, {"acc": acc_b}, f"{pre_steps}+{steps}", seconds)]


# ------------------------------------- ObjectScanpathTransformer: raster search on digit mosaics


class LinearPositionOAT(ObjectScanpathTransformer):
    """The baseline: a learned linear map of the object centre instead of the object positional encoding."""

    def __init__(self, feature_dim: int, **config):
        super().__init__(feature_dim, **config)
        self.position_map = nn.Linear(2, self.dim // 2)

    def position_encoding(self, positions):
        return self.position_map(positions)


def make_scenes(images, labels, count_: int, g: torch.Generator):
    """3x3 mosaics, objects shuffled; scanpath = tiles in raster order up to the target -> model inputs, targets."""
    by_class = [(labels == c).nonzero().flatten() for c in range(10)]
    pick = lambda c: by_class[c][torch.randint(len(by_class[c]), (), generator=g)]
    features, positions, target_features, fixations, targets = [], [], [], [], []
    grid = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij"), -1).flatten(0, 1)  # (9, [row, col])
    for _ in range(count_):
        target = int(torch.randint(10, (), generator=g))
        others = torch.tensor([c for c in range(10) if c != target])
        classes = others[torch.randint(9, (9,), generator=g)]
        target_tile = int(torch.randint(9, (), generator=g))
        classes[target_tile] = target
        shuffle = torch.randperm(9, generator=g)  # object i shows tile shuffle[i]
        tile_items = torch.stack([pick(int(c)) for c in classes])
        features.append(images[tile_items[shuffle]].flatten(1))
        centre = (grid[shuffle].float() + 0.5) / 3 + (torch.rand(9, 2, generator=g) - 0.5) * 0.06
        positions.append(centre[:, [1, 0]])  # (x, y)
        target_features.append(images[pick(target)].flatten())
        object_of_tile = shuffle.argsort()
        path = object_of_tile[: target_tile + 1]
        fixations.append(torch.cat((path, path.new_zeros(9 - len(path)))))
        targets.append(torch.cat((path, torch.tensor([9]), torch.full((9 - len(path),), -100))))
    return (torch.stack(features), torch.stack(positions), torch.stack(target_features), torch.stack(fixations)), \
        torch.stack(targets)


def demo_oat(digits: Digits, seed: int):
    g = torch.Generator().manual_seed(seed)
    train_inputs, train_targets = make_scenes(*digits.train, 3000, g)
    test_inputs, test_targets = make_scenes(*digits.test, 1000, g)
    steps, batch = 400, 32
    order = torch.randint(3000, (steps, batch), generator=g)
    config = {"dim": 32, "num_heads": 2, "num_encoder_layers": 2, "num_decoder_layers": 2, "ffn_dim": 64, "readout_heads": 2,
                  "position_scale": 0.1, "dropout": 0.0}

    def run(model):
        def loss_of(step):
            logits = model(*(t[order[step]] for t in train_inputs))
            return F.cross_entropy(logits.flatten(0, 1), train_targets[order[step]].flatten(), ignore_index=-100)

        fit(model, loss_of, steps, 2e-3)
        with torch.no_grad():
            predicted = model(*test_inputs).argmax(-1)
        real = test_targets != -100
        return (predicted[real] == test_targets[real]).float().mean().item()

    torch.manual_seed(seed)
    oat = modules.create("ObjectScanpathTransformer", feature_dim=64, **config)
    torch.manual_seed(seed)
    base = LinearPositionOAT(64, **config)
    start = time.perf_counter()
    acc_oat, acc_base = run(oat), run(base)
    seconds = time.perf_counter() - start
    task = "3x3 digit mosaics, raster search to target; baseline linear (x, y) position map"
    return [("ObjectScanpathTransformer", task, count(oat), count(base), {"next_fixation_acc": acc_oat},
             {"next_fixation_acc": acc_base}, steps, seconds)]


def summary(values: list[dict[str, float]]) -> str:
    """Metrics over the seeds: 'name mean +- sd' (sd over seeds, n - 1), or '-' where there are none."""
    if not values[0]:
        return "-"
    cells = []
    for key in values[0]:
        column = torch.tensor([v[key] for v in values], dtype=torch.float64)
        spread = f" +- {column.std().item():.3f}" if len(column) > 1 else ""
        cells.append(f"{key} {column.mean().item():.3f}{spread}")
    return ", ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="the first seed; seeds seed, seed + 1, ... are run")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (each one a fresh split and init)")
    parser.add_argument("--only", nargs="*", default=None, help="demo names: acmil dsl dare padapter oat")
    args = parser.parse_args()
    torch.set_num_threads(1)
    demos = {"acmil": demo_acmil, "dsl": demo_dsl, "dare": demo_dare, "padapter": demo_padapter, "oat": demo_oat}
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"seeds {seeds}, torch {torch.__version__}, 1 thread; digits split in half (train / test) per seed; "
          "metrics: mean +- sd over the seeds; seconds: all seeds, both arms")
    print("module | task | params (module model / baseline) | metric module | metric baseline | steps | seconds")
    for name in args.only or demos:
        runs = []
        for seed in seeds:
            torch.manual_seed(seed)
            runs.append(demos[name](Digits(seed), seed))
        for row, per_seed in enumerate(zip(*runs)):
            module, task, params, base_params, _, _, steps, _ = per_seed[0]
            seconds = f"{sum(r[7] for r in per_seed):.1f}" if row == 0 else "(in the row above)"
            print(f"{module} | {task} | {params} / {base_params} | {summary([r[4] for r in per_seed])} | "
                  f"{summary([r[5] for r in per_seed])} | {steps} | {seconds}", flush=True)


if __name__ == "__main__":
    main()
