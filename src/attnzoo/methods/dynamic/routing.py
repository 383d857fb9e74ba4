"""Routing Transformer: k-means routing of queries and keys, attention within clusters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnzoo.methods.dynamic import naive
from attnzoo.methods.dynamic.base import DynamicMethod, Selection

from ...errors import InvalidArgumentError, check_int
from ...kernels.block_sparse.builders import compact
from ...kernels.dense import causal_mask, repeat_kv
from ...method import Call, MethodInfo
from ...registry import register

MAX_BALANCED_CLUSTERS = 62


@register
class Routing(DynamicMethod):
    """Routing attention ("Efficient Content-Based Sparse Attention with Routing Transformers",
    arXiv 2003.05997): queries and keys, unit-normalised, are routed to ``num_clusters`` shared
    centroids, and each query attends exactly to the keys routed with it (and only to earlier ones
    when causal). ``balanced=True`` (the paper's, for its implementation): every centroid takes
    its ``window`` nearest queries and its ``window`` nearest keys (top-w by similarity; default
    w = ceil(N / num_clusters) on each side), so clusters hold equal numbers of tokens and a token
    may be in several clusters or none; a query in several attends to the union of their keys in
    one softmax (lucidrains' routing-transformer averages the per-cluster outputs instead), a query
    in none, or whose clusters hold no visible key, gets zeros (in the paper routing heads sit
    beside local heads). ``balanced=False`` (not the paper's): each token joins its nearest
    centroid only, so clusters can be very uneven. Training-free: the centroids are fitted per call
    and head by ``iterations`` steps of spherical k-means over the queries and keys (the paper's
    online k-means updates them during training instead), started farthest-first (not in the
    paper: a ``seed``-drawn token, then each next the token least similar to those chosen), so
    that clusters which random starts would merge each get a centroid.
    Execution: per head, the cluster members (copies, when balanced) are laid out cluster by
    cluster, so a cluster is a contiguous range and each query block visits the key blocks of its
    clusters on the block executor; copies of a query merge by log-sum-exp.
    q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D|Dv). Cost O(N C D) routing + O(N^2 D / C) attention."""

    info = MethodInfo(
        name="routing", title="Efficient Content-Based Sparse Attention with Routing Transformers", arxiv="2003.05997",
        family=("dynamic",), causal=True, non_causal=True, cross=True, gqa=True, training_free=True,
        time="O(N C D + N^2 D / C)", memory="O(N (D + C)) plus the gathered key blocks",
        summary="k-means routing of queries and keys; attention within each (balanced) cluster",
    )

    @dataclass
    class Config:
        num_clusters: int = 4
        iterations: int = 3
        seed: int = 0
        block_size: int = 32
        balanced: bool = True
        window: int | None = None

        def __post_init__(self):
            self.num_clusters = check_int("num_clusters", self.num_clusters)
            self.iterations = check_int("iterations", self.iterations, minimum=0)
            self.seed = check_int("seed", self.seed, minimum=0)
            self.block_size = check_int("block_size", self.block_size, minimum=2)
            if not isinstance(self.balanced, bool):
                raise InvalidArgumentError("balanced", "a bool", repr(self.balanced))
            if self.window is not None:
                self.window = check_int("window", self.window)
            if self.balanced and self.num_clusters > MAX_BALANCED_CLUSTERS:
                raise InvalidArgumentError("num_clusters", f"at most {MAX_BALANCED_CLUSTERS} with balanced=True "
                                           "(cluster memberships are bits of an int64)", self.num_clusters)

    def centroids(self, qn, kn) -> torch.Tensor:
        """(B, Hq, C, D) unit centroids: spherical k-means over the unit queries and keys."""
        tokens = torch.cat([qn, kn], dim=2)
        centroids = self.seeds(tokens)
        for _ in range(self.config.iterations):
            assign = (tokens @ centroids.transpose(-1, -2)).argmax(-1)
            sums = torch.zeros_like(centroids).scatter_add_(2, assign[..., None].expand_as(tokens), tokens)
            centroids = torch.where(sums.norm(dim=-1, keepdim=True) > 0, F.normalize(sums, dim=-1), centroids)
        return centroids

    def seeds(self, tokens) -> torch.Tensor:
        """(B, Hq, C, D) starting centroids among the unit ``tokens`` (B, Hq, T, D): the token that
        ``seed`` draws, then, one at a time, the token least similar to every centroid so far
        (farthest-first), so that well-separated clusters each get a centroid."""
        gen = torch.Generator().manual_seed(self.config.seed)
        first = int(torch.randint(tokens.shape[2], (1,), generator=gen))
        chosen = tokens[:, :, first : first + 1]
        closest = (tokens @ chosen.transpose(-1, -2))[..., 0]  # (B, Hq, T): similarity to the nearest centroid
        for _ in range(min(self.config.num_clusters, tokens.shape[2]) - 1):
            far = closest.argmin(-1)
            picked = torch.gather(tokens, 2, far[..., None, None].expand(-1, -1, 1, tokens.shape[-1]))
            chosen = torch.cat([chosen, picked], 2)
            closest = torch.maximum(closest, (tokens @ picked.transpose(-1, -2))[..., 0])
        return chosen

    def _unit(self, q, k, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(q.float(), dim=-1), F.normalize(repeat_kv(k, call.groups).float(), dim=-1)

    def clusters(self, q, k, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest-centroid ids of the queries (B, Hq, Nq) and keys (B, Hq, Nk) (``balanced=False``)."""
        qn, kn = self._unit(q, k, call)
        centroids = self.centroids(qn, kn).transpose(-1, -2)
        return (qn @ centroids).argmax(-1), (kn @ centroids).argmax(-1)

    def members(self, q, k, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced clusters: (B, Hq, C, wq) query and (B, Hq, C, wk) key ids, each centroid's
        nearest ``window`` (default ceil(N / C)) tokens, nearest first."""
        qn, kn = self._unit(q, k, call)
        centroids = self.centroids(qn, kn)
        count = centroids.shape[2]
        wq = min(self.config.window or -(-call.len_q // count), call.len_q)
        wk = min(self.config.window or -(-call.len_kv // count), call.len_kv)
        q_ids = (centroids @ qn.transpose(-1, -2)).topk(wq, dim=-1).indices
        k_ids = (centroids @ kn.transpose(-1, -2)).topk(wk, dim=-1).indices
        return q_ids, k_ids

    def _routed(self, q, k, call: Call):
        """Cluster of each laid-out query and key (B, Hq, M), nondecreasing, and the token each
        stands for: nearest-centroid clusters sorted, or the balanced members cluster by cluster."""
        if not self.config.balanced:
            cq, ck = self.clusters(q, k, call)
            (cq_s, q_pos), (ck_s, k_pos) = torch.sort(cq, dim=-1, stable=True), torch.sort(ck, dim=-1, stable=True)
            return cq_s, q_pos, ck_s, k_pos
        q_ids, k_ids = self.members(q, k, call)
        label = torch.arange(q_ids.shape[2], device=q.device)[:, None]
        return (label.expand_as(q_ids[0, 0]).flatten().expand(*q_ids.shape[:2], -1), q_ids.flatten(2),
                label.expand_as(k_ids[0, 0]).flatten().expand(*k_ids.shape[:2], -1), k_ids.flatten(2))

    def plan(self, q, k, call: Call) -> Selection:
        """The layout in cluster order, with each laid-out query's and key's original index."""
        b = self.config.block_size
        cq_s, q_pos, ck_s, k_pos = self._routed(q, k, call)
        n_q, n_k = cq_s.shape[-1], ck_s.shape[-1]
        nqb = -(-n_q // b)
        first = cq_s[..., :: b]  # cluster of each laid-out query block's first and last query
        last = cq_s[..., (torch.arange(nqb, device=q.device) * b + b).clamp(max=n_q) - 1]
        lo = torch.searchsorted(ck_s.contiguous(), first.contiguous(), side="left") // b
        hi = (torch.searchsorted(ck_s.contiguous(), last.contiguous(), side="right") - 1) // b
        width = max(int((hi - lo).max()) + 1, 1)
        keys = lo[..., None] + torch.arange(width, device=q.device)
        keys = torch.where(keys <= hi[..., None], keys, -1)
        off = call.len_kv - call.len_q
        if self.config.balanced:  # a pair counts in the first cluster both are in, so no key counts twice
            q_bits, k_bits = _cluster_bits(q_pos, cq_s, call.len_q), _cluster_bits(k_pos, ck_s, call.len_kv)
            q_bits, k_bits = q_bits.gather(-1, q_pos), k_bits.gather(-1, k_pos)

        def mask_mod(bi, hi_, q_idx, kv_idx):
            cluster = cq_s[bi, hi_][q_idx]
            same = cluster == ck_s[bi, hi_][kv_idx]
            if self.config.balanced:
                shared = q_bits[bi, hi_][q_idx] & k_bits[bi, hi_][kv_idx]
                same = same & ((shared & -shared) == (1 << cluster))
            return same & (k_pos[bi, hi_][kv_idx] <= q_pos[bi, hi_][q_idx] + off) if call.causal else same

        layout = compact(keys, n_q, n_k, b, kv_block=b, mask_mod=mask_mod)
        return Selection(layout, q_pos, k_pos, repeats=self.config.balanced)

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        cfg = self.config
        support = naive.routing_support(q, k, num_clusters=cfg.num_clusters, iterations=cfg.iterations, seed=cfg.seed,
                                        window=cfg.window, balanced=cfg.balanced, causal=call.causal)
        return naive.support_reference(q, k, v, support, call.scale)

    def _support(self, q, k, v, call: Call) -> torch.Tensor:
        if self.config.balanced:  # in some cluster together
            q_ids, k_ids = self.members(q, k, call)
            in_q = torch.zeros(*q_ids.shape[:3], call.len_q, device=q.device).scatter_(-1, q_ids, 1.0)  # (B, Hq, C, Nq)
            in_k = torch.zeros(*k_ids.shape[:3], call.len_kv, device=q.device).scatter_(-1, k_ids, 1.0)
            same = (in_q.transpose(-1, -2) @ in_k) > 0
        else:
            cq, ck = self.clusters(q, k, call)
            same = cq[..., :, None] == ck[..., None, :]
        return same & causal_mask(call.len_q, call.len_kv, q.device) if call.causal else same


def _cluster_bits(pos: torch.Tensor, cluster: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, n) int64: bit c set where the token is in cluster c (``pos``/``cluster`` (B, H, M):
    each member's token and cluster)."""
    bits = torch.zeros(*pos.shape[:2], n, dtype=torch.long, device=pos.device)
    return bits.scatter_reduce_(-1, pos, 1 << cluster, "sum")
