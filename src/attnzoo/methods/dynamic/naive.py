"""Literal selections of the content-selected methods, written from the papers (and the library's
documented additions: always-visited blocks, block granularity): what each method's ``.reference``
computes. Plain loops over batches, heads, query blocks, tree levels, regions and clusters, sharing
no selection code with the fast paths (as flash-linear-attention keeps a naive version beside each
kernel), so that a test of the fast path against ``.reference`` tests the selection, not only the
executor. Slow (Python loops): meant for tests and short inputs.

Each ``*_support`` returns the (B, Hq, Nq, Nk) boolean support in the original token order, chosen
without gradients from float64 scores (``routing`` in float32, as the method routes); queries align
bottom-right with the keys when causal. The ``*_reference`` functions return the attention output
(B, Hq, Nq, Dv) in q's dtype, differentiable in q, k and v.
"""

from __future__ import annotations

import math

import torch

from ...kernels.dense import masked_attention
from ..linear.naive import expand_heads, positive_random_features


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, N, E) -> (B, heads, N, E) float64 without gradients (what a selection scores)."""
    return expand_heads(x.detach().double(), heads)


def top_keys(scores: dict, count: int) -> list:
    """The ``count`` keys of ``scores`` with the highest values, best first."""
    return sorted(scores, key=lambda x: -scores[x])[:count]


def diagonal_block(i: int, block: int, nq: int, nk: int, causal: bool, kv_block: int) -> int:
    """The last key block query block i may visit (-1: none): the one holding the key its last query
    reaches when causal, the last key block otherwise."""
    if not causal:
        return math.ceil(nk / kv_block) - 1
    reach = min(nq, (i + 1) * block) - 1 + nk - nq
    return reach // kv_block if reach >= 0 else -1


def always_visited(diag: int, causal: bool, local_blocks: int) -> list[int]:
    """The diagonal block, the first block and the ``local_blocks`` before the diagonal when causal
    (in that order, each once, only those in [0, diag]); the first block otherwise."""
    wanted = [diag, 0, *range(diag - 1, diag - 1 - local_blocks, -1)] if causal else [0]
    out: list[int] = []
    for x in wanted:
        if 0 <= x <= diag and x not in out:
            out.append(x)
    return out


def _spread_rows(i: int, block: int, nq: int, samples: int) -> list[int]:
    """``samples`` (at most the block's size) evenly spaced queries of query block i, ending at its
    last one: last - floor(j length / r) for j < r (a short block repeats queries)."""
    first, last = i * block, min(nq, (i + 1) * block) - 1
    r = min(samples, block)
    return [last - (j * (last - first + 1)) // r for j in range(r)]


def _mean(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Mean of the rows [lo, min(hi, len)) of x (N, D)."""
    return x[lo : min(hi, x.shape[0])].mean(0)


def block_support(blocks: dict, shape, block: int, causal: bool, kv_block: int) -> torch.Tensor:
    """Support from ``blocks[(b, h, query block)]`` = key block ids, each block ``block`` queries by
    ``kv_block`` keys, causal pairs only."""
    nq, nk = shape[2:]
    out = torch.zeros(shape, dtype=torch.bool)
    for (b, h, i), chosen in blocks.items():
        rows = torch.arange(i * block, min(nq, (i + 1) * block))
        for kb in chosen:
            keys = torch.arange(kb * kv_block, min(nk, (kb + 1) * kv_block))
            seen = keys[None, :] <= rows[:, None] + nk - nq if causal else torch.ones(len(rows), len(keys), dtype=torch.bool)
            out[b, h, rows[:, None], keys[None, :]] = seen
    return out


def _attention_row(q_row: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax weights of one query (D,) over ``keys`` (n, D)."""
    return torch.softmax((keys @ q_row) * scale, 0)


def support_reference(q, k, v, support: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact softmax attention of q (B, Hq, Nq, D) over k, v (B, Hkv, Nk, D|Dv) where ``support``
    allows (zeros for a query with no key), in q's dtype."""
    return masked_attention(q, k, v, support.to(q.device), scale=scale)


# ---- MInference block-sparse ------------------------------------------------------------------
@torch.no_grad()
def block_sparse_support(q, k, *, top_k: int, block_size: int, local_blocks: int, causal: bool, scale: float,
                         estimator: str = "pooled_qk", samples: int = 4) -> torch.Tensor:
    """Each query block scores every visible key block: ``"pooled_qk"`` (the paper's) by its mean
    query . the block's mean key, ``"sampled_q"`` by the exact attention mass that ``samples``
    evenly spaced queries of the block put on the block's keys; the always-visited blocks count
    toward ``top_k`` and the rest are filled with the best scored."""
    B, H, nq, _ = q.shape
    q, k = q.detach().double(), _heads(k, H)
    nk, b = k.shape[2], block_size
    top_k = min(top_k, math.ceil(nk / b))
    blocks = {}
    for bi in range(B):
        for h in range(H):
            for i in range(math.ceil(nq / b)):
                diag = diagonal_block(i, b, nq, nk, causal, b)
                if estimator == "sampled_q":
                    mass = torch.zeros(nk, dtype=torch.float64)
                    for p in _spread_rows(i, b, nq, samples):
                        seen = p + nk - nq + 1 if causal else nk
                        if seen > 0:
                            mass[:seen] += _attention_row(q[bi, h, p], k[bi, h, :seen], scale)
                    score = {j: float(mass[j * b : (j + 1) * b].sum()) for j in range(diag + 1)}
                else:
                    query = _mean(q[bi, h], i * b, (i + 1) * b)
                    score = {j: float(query @ _mean(k[bi, h], j * b, (j + 1) * b)) * scale for j in range(diag + 1)}
                chosen = always_visited(diag, causal, local_blocks)[:top_k]
                rest = top_keys({j: s for j, s in score.items() if j not in chosen}, top_k - len(chosen))
                blocks[bi, h, i] = chosen + rest
    return block_support(blocks, (B, H, nq, nk), b, causal, b)


# ---- HiP ---------------------------------------------------------------------------------------
def _hip_branch_score(kind: str, queries, positions, keys, lo: int, hi: int, bk: int, nq: int, nk: int, causal: bool,
                      sampled: bool) -> float:
    """Score of the branch of key blocks [lo, hi) for one query block: ``"paper"`` the largest logit
    between its queries (at ``positions``) and the tokens of the centre block lo + (hi - lo) // 2
    (causal pairs only); ``"pooled"`` the mean query against the centre block's mean key;
    ``"bound"`` Quest's bound sum_d max(q_d max_j k_jd, q_d min_j k_jd) over every key of the range,
    the mean query's (the largest over the queries when they are ``sampled``)."""
    centre = lo + (hi - lo) // 2
    if kind == "pooled":
        return float(queries.mean(0) @ _mean(keys, centre * bk, (centre + 1) * bk))
    if kind == "bound":
        span = keys[lo * bk : min(nk, hi * bk)]
        scoring = queries if sampled else queries.mean(0, keepdim=True)
        return max(float(torch.maximum(x * span.max(0).values, x * span.min(0).values).sum()) for x in scoring)
    block = torch.arange(centre * bk, min(nk, (centre + 1) * bk))
    logits = queries @ keys[block].T  # (queries, keys of the centre block)
    if causal:
        logits = logits.masked_fill(block[None, :] > torch.tensor(positions)[:, None] + nk - nq, -math.inf)
    return float(logits.max())


def _hip_rerank(q_rows, keys, shortlist: list[int], forced: list[int], bk: int, nq: int, nk: int, causal: bool,
                rows: list[int], scale: float, top_k: int) -> list[int]:
    """The ``top_k`` shortlisted blocks (those not forced) on which the queries ``rows`` put the most
    attention mass, each query's softmax running over the keys of the shortlisted and forced blocks
    it may see."""
    shortlist = [blk for blk in shortlist if blk not in forced]
    listed = torch.tensor([j for blk in shortlist + forced for j in range(blk * bk, min(nk, (blk + 1) * bk))])
    mass = dict.fromkeys(shortlist, 0.0)
    for p in rows:
        seen = listed[listed <= p + nk - nq] if causal else listed
        if len(seen):
            weights = _attention_row(q_rows[p], keys[seen], scale)
            for blk in shortlist:
                mass[blk] += float(weights[seen // bk == blk].sum())
    return top_keys(mass, top_k)


@torch.no_grad()
def hip_support(q, k, *, top_k: int, block_size: int, local_blocks: int, causal: bool, branch_score: str,
                key_block_size: int | None = None, query_samples: int = 0, candidates: int = 1, rerank_samples: int = 4,
                scale: float = 1.0) -> torch.Tensor:
    """HiP's tree search per query block: the visible key blocks in w equal ranges; at every level
    each range splits into two halves, every half is scored (:func:`_hip_branch_score`) and the w
    best halves survive, until each range is one block; the always-visited blocks are added.
    ``query_samples`` r > 0: r evenly spaced queries of the block score instead of all. w is
    ``top_k``, or with ``candidates`` c > 1 (not in the paper) c ``top_k``: a shortlist of which
    the ``top_k`` blocks with the most exact attention mass of ``rerank_samples`` queries stay
    (:func:`_hip_rerank`)."""
    B, H, nq, _ = q.shape
    q, k = q.detach().double(), _heads(k, H)
    nk, bq = k.shape[2], block_size
    bk = key_block_size or block_size
    top_k = min(top_k, math.ceil(nk / bk))
    width = min(top_k * candidates, math.ceil(nk / bk))
    blocks = {}
    for bi in range(B):
        for h in range(H):
            for i in range(math.ceil(nq / bq)):
                diag = diagonal_block(i, bq, nq, nk, causal, bk)
                visible = max(diag + 1, 0)
                positions = _spread_rows(i, bq, nq, query_samples) if query_samples else list(range(i * bq, min(nq, (i + 1) * bq)))
                queries = q[bi, h, positions]
                ranges = [(t * visible // width, (t + 1) * visible // width) for t in range(width)]
                ranges = [r for r in ranges if r[1] > r[0]]
                while any(hi - lo > 1 for lo, hi in ranges):
                    halves = []
                    for lo, hi in ranges:
                        mid = (lo + hi + 1) // 2
                        halves += [r for r in ((lo, mid), (mid, hi)) if r[1] > r[0]]
                    scores = {r: _hip_branch_score(branch_score, queries, positions, k[bi, h], *r, bk, nq, nk, causal,
                                                   sampled=query_samples > 0) for r in halves}
                    ranges = top_keys(scores, width)
                found = [lo for lo, _ in ranges]
                forced = always_visited(diag, causal, local_blocks)
                if width > top_k:
                    found = _hip_rerank(q[bi, h], k[bi, h], found, forced, bk, nq, nk, causal,
                                        _spread_rows(i, bq, nq, rerank_samples), scale, top_k)
                blocks[bi, h, i] = sorted(set(found) | set(forced))
    return block_support(blocks, (B, H, nq, nk), bq, causal, bk)


# ---- MInference vertical-slash -----------------------------------------------------------------
@torch.no_grad()
def vertical_slash_support(q, k, *, vertical_blocks: int, slash_blocks: int, block_size: int, local_blocks: int,
                           last_q: int, vertical_columns: int, causal: bool, scale: float,
                           estimate_queries: str = "last", last_columns: int = 0) -> torch.Tensor:
    """MInference's estimate: the last ``last_q`` queries (``estimate_queries="spread"``, not the
    paper's: ``last_q`` queries evenly spread over the sequence) attend densely (causal); their
    attention summed per key is the vertical score, summed per diagonal (query position - key
    position) the slash score. At block granularity a key block's vertical score sums its keys, a
    block diagonal d sums the token diagonals in [(d - 1) b, (d + 1) b); block 0 and diagonals 0 ..
    ``local_blocks`` always win. Every query block visits the chosen vertical blocks, the key block
    at each chosen block distance from its diagonal block, and the ``vertical_columns`` single keys
    with the most vertical score outside the vertical blocks; with the spread estimate, ``last_columns``
    of those columns instead go to the keys the last 64 queries (MInference's estimate) attend to
    most, outside the vertical blocks, the other columns and the last queries' own diagonal blocks.
    Causal only."""
    B, H, nq, _ = q.shape
    q, k = q.detach().double(), _heads(k, H)
    nk, b = k.shape[2], block_size
    nkb, off = math.ceil(nk / b), nk - nq
    n = min(last_q, nq)
    estimating = range(nq - n, nq) if estimate_queries == "last" else [round(j * (nq - 1) / max(n - 1, 1)) for j in range(n)]
    late = min(last_columns, vertical_columns) if estimate_queries == "spread" else 0
    asking = min(64, nq)
    near = nk - asking - (local_blocks + 1) * b  # keys from here on lie in the last queries' own diagonal blocks
    blocks, columns = {}, {}
    for bi in range(B):
        for h in range(H):
            vertical = torch.zeros(nk, dtype=torch.float64)
            slash = torch.zeros(nk, dtype=torch.float64)
            last_vertical = torch.zeros(nk, dtype=torch.float64)
            for p in estimating:
                reach = p + off
                if reach >= 0:
                    weights = _attention_row(q[bi, h, p], k[bi, h, : reach + 1], scale)
                    vertical[: reach + 1] += weights
                    slash[: reach + 1] += weights.flip(0)  # key j lies on diagonal reach - j
            for p in range(nq - asking, nq) if late else []:
                if p + off >= 0:
                    last_vertical[: p + off + 1] += _attention_row(q[bi, h, p], k[bi, h, : p + off + 1], scale)
            v_score = {kb: float(vertical[kb * b : (kb + 1) * b].sum()) for kb in range(nkb)}
            s_score = {d: float(slash[max(0, (d - 1) * b) : (d + 1) * b].sum()) for d in range(nkb)}
            v_score[0] = math.inf
            for d in range(min(local_blocks + 1, nkb)):
                s_score[d] = math.inf
            verticals = top_keys(v_score, min(vertical_blocks, nkb))
            distances = top_keys(s_score, min(slash_blocks, nkb))
            outside = {j: float(vertical[j]) for j in range(nk) if j // b not in verticals}
            columns[bi, h] = top_keys(outside, min(vertical_columns - late, nk)) if vertical_columns else []
            if late:
                candidates = {j: float(last_vertical[j]) for j in outside if j not in columns[bi, h] and j < near and last_vertical[j] > 0}
                columns[bi, h] = columns[bi, h] + top_keys(candidates, min(late, len(candidates)))
            for i in range(math.ceil(nq / b)):
                diag = diagonal_block(i, b, nq, nk, True, b)
                blocks[bi, h, i] = {v for v in verticals if v <= diag} | {diag - d for d in distances if diag - d >= 0}
    support = block_support(blocks, (B, H, nq, nk), b, True, b)
    rows = torch.arange(nq)[:, None]
    for (bi, h), cols in columns.items():
        if cols:
            ids = torch.tensor(cols)
            support[bi, h, :, ids] |= ids[None, :] <= rows + off
    return support


# ---- BiFormer ----------------------------------------------------------------------------------
def _region_of(token: int, grid: tuple[int, ...], n_win: int) -> int:
    """The region (row-major over the n_win x n_win windows; a chunk in 1-D) holding ``token``."""
    if len(grid) == 1:
        return token // (grid[0] // n_win)
    row, col = divmod(token, grid[1])
    return (row // (grid[0] // n_win)) * n_win + col // (grid[1] // n_win)


def _regions(n: int, grid: tuple[int, ...] | None, n_win: int) -> list[list[int]]:
    """The tokens of each region, regions in row-major order of the windows."""
    grid = grid or (n,)
    count = n_win ** len(grid)
    members: list[list[int]] = [[] for _ in range(count)]
    for t in range(n):
        members[_region_of(t, grid, n_win)].append(t)
    return members


@torch.no_grad()
def biformer_support(q, k, *, n_win: int, topk: int, grid: tuple[int, ...] | None) -> torch.Tensor:
    """BiFormer's bi-level routing: region queries and keys are the means of their tokens' q and k
    (all heads concatenated), the region affinity is their dot product, each region keeps its
    ``topk`` regions of highest affinity and its tokens attend to every token of those."""
    B, H, n, _ = q.shape
    q, k = q.detach().double(), _heads(k, H)
    members = _regions(n, grid, n_win)
    support = torch.zeros(B, H, n, n, dtype=torch.bool)
    for bi in range(B):
        qr = [torch.cat([q[bi, h, m].mean(0) for h in range(H)]) for m in members]
        kr = [torch.cat([k[bi, h, m].mean(0) for h in range(H)]) for m in members]
        for r, m in enumerate(members):
            routed = top_keys({s: float(qr[r] @ kr[s]) for s in range(len(members))}, topk)
            keys = torch.tensor([t for s in routed for t in members[s]])
            support[bi, :, torch.tensor(m)[:, None], keys[None, :]] = True
    return support


# ---- Routing Transformer -----------------------------------------------------------------------
@torch.no_grad()
def routing_support(q, k, *, num_clusters: int, iterations: int, seed: int, window: int | None, balanced: bool,
                    causal: bool) -> torch.Tensor:
    """Routing attention: unit queries and keys; spherical k-means (each token to its most similar
    centroid, each centroid the normalised sum of its tokens, kept when empty) started
    farthest-first from the token ``randint(seed)`` draws. ``balanced`` (the paper's): each
    centroid takes its ``window`` (default ceil(N / C)) most similar queries and keys and a query
    attends to every key sharing a cluster with it; otherwise each token joins its most similar
    centroid. In float32, as the method routes."""
    B, H, nq, _ = q.shape
    k = expand_heads(k.detach().float(), H)
    nk = k.shape[2]
    support = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    for bi in range(B):
        for h in range(H):
            qn = q[bi, h].detach().float()
            qn = qn / qn.norm(dim=-1, keepdim=True)
            kn = k[bi, h] / k[bi, h].norm(dim=-1, keepdim=True)
            tokens = torch.cat([qn, kn])  # (Nq + Nk, D)
            count = min(num_clusters, len(tokens))
            centroids = [tokens[int(torch.randint(len(tokens), (1,), generator=torch.Generator().manual_seed(seed)))]]
            while len(centroids) < count:  # farthest-first: the token least similar to its nearest centroid
                nearest_similarity = torch.stack([tokens @ c for c in centroids]).max(0).values
                centroids.append(tokens[int(nearest_similarity.argmin())])
            for _ in range(iterations):
                nearest = torch.stack([tokens @ c for c in centroids]).argmax(0)
                sums = [tokens[nearest == c].sum(0) for c in range(count)]
                centroids = [s / s.norm() if float(s.norm()) > 0 else c for s, c in zip(sums, centroids)]
            if balanced:
                wq, wk = min(window or math.ceil(nq / count), nq), min(window or math.ceil(nk / count), nk)
                clusters = [(top_keys(dict(enumerate((qn @ c).tolist())), wq), top_keys(dict(enumerate((kn @ c).tolist())), wk))
                            for c in centroids]
            else:
                nearest = torch.stack([tokens @ c for c in centroids]).argmax(0).tolist()
                clusters = [([i for i in range(nq) if nearest[i] == c], [j for j in range(nk) if nearest[nq + j] == c])
                            for c in range(count)]
            for queries, keys in clusters:
                if queries and keys:
                    i, j = torch.tensor(queries)[:, None], torch.tensor(keys)[None, :]
                    support[bi, h, i, j] |= j <= i + nk - nq if causal else True
    return support


# ---- HyperAttention -----------------------------------------------------------------------------
def _gray_position(code: int) -> int:
    """Position of ``code`` in the reflected Gray sequence (g -> g ^ g >> 1 inverted)."""
    position = 0
    while code:
        position ^= code
        code >>= 1
    return position


def _lsh_order(x: torch.Tensor, planes: torch.Tensor) -> list[int]:
    """Tokens of x (N, D) sorted (stably) by the Gray position of their angular hash: bit i is
    whether the token lies on the positive side of hyperplane i."""
    sides = (x.float() @ planes > 0).tolist()
    codes = [sum(1 << i for i, positive in enumerate(row) if positive) for row in sides]
    return sorted(range(len(codes)), key=lambda t: _gray_position(codes[t]))


@torch.no_grad()
def hyper_log_weights(q, k, *, block_size: int, sample_size: int, num_projections: int, min_seq_len: int, seed: int,
                      causal: bool) -> torch.Tensor:
    """(B, Hq, N, N) float64 log-weights of HyperAttention (arXiv 2310.05868), -inf off the
    support. Non-causal: sortLSH pairs a query with the keys of its block in the hash order
    (log-weight 0) and with ``sample_size`` uniformly sampled other keys (log(n / m)). Causal: the
    recursion splits a causal square into two causal halves and the off-diagonal rectangle (the
    non-causal case; an odd square's last row of it exactly), down to ``min_seq_len`` (exact).
    Random draws in the method's order: the hyperplanes, then one key sample per rectangle."""
    B, H, n, D = q.shape
    k = _heads(k, H)
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randn(D, num_projections, generator=gen)
    weights = torch.full((B, H, n, n), -math.inf, dtype=torch.float64)

    def rectangle(q0: int, k0: int, size: int) -> None:
        if size <= min_seq_len or size <= block_size + sample_size:
            weights[:, :, q0 : q0 + size, k0 : k0 + size] = 0.0
            return
        samples = torch.randperm(size, generator=gen)[:sample_size].tolist()
        for bi in range(B):
            for h in range(H):
                q_sorted = _lsh_order(q[bi, h, q0 : q0 + size], planes)
                k_sorted = _lsh_order(k[bi, h, k0 : k0 + size], planes)
                block_of_key = {key: rank // block_size for rank, key in enumerate(k_sorted)}
                for rank, query in enumerate(q_sorted):
                    row = weights[bi, h, q0 + query]
                    sampled = [k0 + key for key in samples if block_of_key[key] != rank // block_size]
                    row[sampled] = math.log(size / len(samples))
                    own = k_sorted[(rank // block_size) * block_size : (rank // block_size + 1) * block_size]
                    row[[k0 + key for key in own]] = 0.0

    def square(a: int, size: int) -> None:
        if size <= min_seq_len:
            for p in range(a, a + size):
                weights[:, :, p, a : p + 1] = 0.0
            return
        half = size // 2
        square(a, half)
        rectangle(a + half, a, half)
        if size % 2:
            weights[:, :, a + size - 1, a : a + half] = 0.0
        square(a + half, size - half)

    if causal:
        square(0, n)
    else:
        rectangle(0, 0, n)
    return weights


def hyper_reference(q, k, v, *, scale: float, **config) -> torch.Tensor:
    """softmax(q k^T scale + :func:`hyper_log_weights`) v, in q's dtype (float64 inside)."""
    log_weights = hyper_log_weights(q, k, **config).to(q.device)
    keys, values = expand_heads(k.double(), q.shape[1]), expand_heads(v.double(), q.shape[1])
    return (torch.softmax((q.double() @ keys.transpose(-1, -2)) * scale + log_weights, -1) @ values).to(q.dtype)


# ---- SEA ---------------------------------------------------------------------------------------
@torch.no_grad()
def sea_support(q, k, *, top_k: int, q_block: int, proj: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """SEA's estimate, training-free: each query's row of Performer attention (features of
    q scale^0.5 and k scale^0.5, normalised over the keys it sees), averaged over a query block;
    the block keeps its own diagonal keys (positions first .. first + q_block - 1 shifted by
    Nk - Nq) and the ``top_k`` keys of highest estimate among the others (earlier ones when causal)."""
    B, H, nq, _ = q.shape
    k = _heads(k, H)
    nk, off = k.shape[2], k.shape[2] - nq
    support = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    for bi in range(B):
        for h in range(H):
            qf = positive_random_features(q[bi, h].detach().double(), proj.double().cpu(), scale)
            kf = positive_random_features(k[bi, h], proj.double().cpu(), scale)
            for i in range(math.ceil(nq / q_block)):
                rows = range(i * q_block, min(nq, (i + 1) * q_block))
                estimate = torch.zeros(nk, dtype=torch.float64)
                for p in rows:
                    seen = torch.arange(nk) <= p + off if causal else torch.ones(nk, dtype=torch.bool)
                    if seen.any():
                        row = kf @ qf[p]
                        estimate += row / row[seen].sum()
                first, last = rows[0] + off, rows[-1] + off
                others = {j: float(estimate[j]) for j in range(nk) if not first <= j <= last and (not causal or j < first)}
                keys = top_keys(others, top_k) + [j for j in range(first, first + q_block) if 0 <= j < nk and j - off < nq]
                for p in rows:
                    support[bi, h, p, keys] = torch.tensor([not causal or j <= p + off for j in keys], dtype=torch.bool)
    return support


# ---- SG-Former ---------------------------------------------------------------------------------
def _sgformer_runs(q, k, members: list[list[int]], num_tokens: int, scale: float) -> dict:
    """The library's default reallocation for one head: region means attend region means, a
    region's significance is the mass it receives; walking the tokens region by region, each
    carries its region's significance shared equally among the region's tokens and joins new token
    floor(M x significance carried before it / total). Returns {token: new token}."""
    qr = torch.stack([q[m].mean(0) for m in members])
    kr = torch.stack([k[m].mean(0) for m in members])
    significance = torch.softmax(qr @ kr.T * scale, -1).mean(0)
    total, carried, new_of = float(significance.sum()), 0.0, {}
    for r, m in enumerate(members):
        for t in m:
            new_of[t] = min(math.floor(num_tokens * carried / total), num_tokens - 1)
            carried += float(significance[r]) / len(m)
    return new_of


def _sgformer_tiers(q, k, members: list[list[int]], num_tokens: int, scale: float) -> dict:
    """SG-Former's reallocation for one head, q/k (N, D): a token's significance is the mass every
    query puts on its region's mean key (global map over down-sampled keys) plus the mass its own
    region's queries put on it (local window map); tokens sorted by significance (stably, in
    region-major order) and the least significant quarter, middle half and top quarter cut into
    1 : 7 : 7 of the new tokens in equal runs. Returns {token: new token}."""
    kr = torch.stack([k[m].mean(0) for m in members])
    global_mass = torch.softmax(q @ kr.T * scale, -1).mean(0)
    significance = {}
    for r, m in enumerate(members):
        local = torch.softmax(q[m] @ k[m].T * scale, -1).mean(0)
        for t, mass in zip(m, local):
            significance[t] = float(global_mass[r]) + float(mass)
    ranked = sorted((t for m in members for t in m), key=lambda t: significance[t])
    n = len(ranked)
    sizes = [n // 4, n - 2 * (n // 4), n // 4]
    low = max(1, num_tokens // 15)
    counts = [min(c, s) for c, s in zip([low, (num_tokens - low) // 2, num_tokens - low - (num_tokens - low) // 2], sizes)]
    new_of, start, first = {}, 0, 0
    for size, count in zip(sizes, counts):
        for rank in range(size):
            new_of[ranked[start + rank]] = first + rank * count // size
        start, first = start + size, first + count
    return new_of


def sgformer_reference(q, k, v, *, n_win: int, num_tokens: int, grid: tuple[int, ...] | None, scale: float,
                       reallocation: str = "runs") -> torch.Tensor:
    """SG-Former's attention: per head the tokens reallocated (``"runs"``, the library's default, or
    ``"tiers"``, the paper's), then every query attends (exact softmax, float64 inside) to the mean
    keys and values of the non-empty new tokens; in q's dtype."""
    B, H, n, _ = q.shape
    k, v = expand_heads(k.double(), H), expand_heads(v.double(), H)
    members = _regions(n, grid, n_win)
    heads = []
    for bi in range(B):
        for h in range(H):
            qh, kh = q[bi, h].detach().double(), k[bi, h].detach()
            rule = _sgformer_tiers if reallocation == "tiers" else _sgformer_runs
            new_of = rule(qh, kh, members, num_tokens, scale)
            groups = [g for g in ([t for t in range(n) if new_of[t] == g] for g in range(num_tokens)) if g]
            kp = torch.stack([k[bi, h, g].mean(0) for g in groups])
            vp = torch.stack([v[bi, h, g].mean(0) for g in groups])
            heads.append(torch.softmax(q[bi, h].double() @ kp.T * scale, -1) @ vp)
    return torch.stack(heads).unflatten(0, (B, H)).to(q.dtype)
