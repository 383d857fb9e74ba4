"""Slow, literal selections of the content-selected methods, written from the papers (and the
library's documented additions: always-visited blocks, block granularity), sharing no code with the
fast paths: plain loops over batches, heads, query blocks, tree levels, regions and clusters. Each
``*_support`` returns the (B, Hq, Nq, Nk) boolean support in the original token order, which
:func:`attend` turns into exact attention for comparison with the method's output.
"""

from __future__ import annotations

import math

import torch
from fidelity.quadratic import expand_heads, positive_random_features


def attend(q, k, v, support: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact softmax attention of q (B, Hq, Nq, D) over the keys ``support`` allows (float64);
    a query with no allowed key gets zeros."""
    k, v = expand_heads(k.double(), q.shape[1]), expand_heads(v.double(), q.shape[1])
    logits = (q.double() @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~support, float("-inf"))
    weights = torch.softmax(logits, -1).nan_to_num(0.0)
    return weights @ v


def sees(p: int, j: int, nq: int, nk: int, causal: bool) -> bool:
    """Query p may see key j: always, or when causal with queries aligned bottom-right."""
    return not causal or j <= p + nk - nq


def block_support(blocks: dict, shape, block: int, causal: bool, kv_block: int | None = None) -> torch.Tensor:
    """Support from ``blocks[(b, h, query block)]`` = key block ids, each block ``block`` (queries)
    by ``kv_block`` (keys) tokens, causal pairs only."""
    nq, nk = shape[2:]
    kv_block = kv_block or block
    out = torch.zeros(shape, dtype=torch.bool)
    keys = torch.arange(nk)
    for (b, h, i), chosen in blocks.items():
        for p in range(i * block, min(nq, (i + 1) * block)):
            seen = keys <= p + nk - nq if causal else torch.ones(nk, dtype=torch.bool)
            for kb in chosen:
                lo, hi = kb * kv_block, min(nk, (kb + 1) * kv_block)
                out[b, h, p, lo:hi] = seen[lo:hi]
    return out


def diagonal_block(i: int, block: int, nq: int, nk: int, causal: bool, kv_block: int | None = None) -> int:
    """The last key block query block i may visit (-1: none): the one holding the key its last query
    reaches when causal, the last key block otherwise."""
    kv_block = kv_block or block
    if not causal:
        return math.ceil(nk / kv_block) - 1
    reach = min(nq, (i + 1) * block) - 1 + nk - nq
    return reach // kv_block if reach >= 0 else -1


def always_visited(diag: int, causal: bool, local_blocks: int) -> list[int]:
    """The diagonal block, the first block and the ``local_blocks`` before the diagonal when causal
    (in that order, each once, only those in [0, diag]); the first block otherwise."""
    wanted = [diag, 0, *range(diag - 1, diag - 1 - local_blocks, -1)] if causal else [0]
    out = []
    for x in wanted:
        if 0 <= x <= diag and x not in out:
            out.append(x)
    return out


def mean_of(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Mean of the rows [lo, min(hi, len)) of x (N, D)."""
    return x[lo : min(hi, x.shape[0])].double().mean(0)


def spread_rows(i: int, block: int, nq: int, samples: int) -> list[int]:
    """``samples`` (at most the block's size) evenly spaced queries of query block i, ending at its
    last one: last - floor(j length / r) for j < r (a short block repeats queries)."""
    first, last = i * block, min(nq, (i + 1) * block) - 1
    r = min(samples, block)
    return [last - (j * (last - first + 1)) // r for j in range(r)]


# ---- MInference block-sparse ------------------------------------------------------------------
def block_sparse_support(q, k, *, top_k: int, block_size: int, local_blocks: int, causal: bool, scale: float,
                         estimator: str = "pooled_qk", samples: int = 4):
    """Each query block scores every visible key block: ``"pooled_qk"`` (the paper's) by its mean
    query . the block's mean key, ``"sampled_q"`` by the exact attention mass that ``samples``
    evenly spaced queries of the block put on the block's keys; the always-visited blocks count
    toward ``top_k`` and the rest are filled with the best scored."""
    B, H, nq, _ = q.shape
    k = expand_heads(k, H)
    nk, b = k.shape[2], block_size
    nkb = math.ceil(nk / b)
    blocks = {}
    for bi in range(B):
        for h in range(H):
            for i in range(math.ceil(nq / b)):
                diag = diagonal_block(i, b, nq, nk, causal)
                if estimator == "sampled_q":
                    mass = torch.zeros(nk, dtype=torch.float64)
                    for p in spread_rows(i, b, nq, samples):
                        seen = p + nk - nq + 1 if causal else nk
                        if seen > 0:
                            mass[:seen] += torch.softmax((k[bi, h, :seen].double() @ q[bi, h, p].double()) * scale, 0)
                    score = {j: float(mass[j * b : (j + 1) * b].sum()) for j in range(diag + 1)}
                else:
                    qm = mean_of(q[bi, h], i * b, (i + 1) * b)
                    score = {j: float(qm @ mean_of(k[bi, h], j * b, (j + 1) * b)) * scale for j in range(diag + 1)}
                chosen = always_visited(diag, causal, local_blocks)[: min(top_k, nkb)]
                rest = sorted((j for j in score if j not in chosen), key=lambda j: -score[j])
                blocks[bi, h, i] = chosen + rest[: min(top_k, nkb) - len(chosen)]
    return block_support(blocks, (B, H, nq, nk), b, causal)


# ---- HiP ---------------------------------------------------------------------------------------
def hip_branch_score(kind: str, queries, positions, keys, lo: int, hi: int, bk: int, nq: int, nk: int, causal: bool,
                     sampled: bool):
    """Score of the branch of key blocks [lo, hi) for one query block: ``"paper"`` the largest logit
    between its queries (at ``positions``) and the tokens of the centre block lo + (hi - lo) // 2
    (causal pairs only); ``"pooled"`` the mean query against the centre block's mean key;
    ``"bound"`` Quest's bound sum_d max(q_d max_j k_jd, q_d min_j k_jd) over every key of the range,
    the mean query's (the largest over the queries when they are ``sampled``)."""
    centre = lo + (hi - lo) // 2
    if kind == "pooled":
        return float(queries.double().mean(0) @ mean_of(keys, centre * bk, (centre + 1) * bk))
    if kind == "bound":
        span = keys[lo * bk : min(nk, hi * bk)].double()
        scoring = queries.double() if sampled else queries.double().mean(0, keepdim=True)
        return max(float(torch.maximum(x * span.max(0).values, x * span.min(0).values).sum()) for x in scoring)
    lo_key, hi_key = centre * bk, min(nk, (centre + 1) * bk)
    logits = queries.double() @ keys[lo_key:hi_key].double().T  # (queries, keys of the centre block)
    for row, p in enumerate(positions):
        for col, j in enumerate(range(lo_key, hi_key)):
            if not sees(p, j, nq, nk, causal):
                logits[row, col] = -math.inf
    return float(logits.max())


def hip_support(q, k, *, top_k: int, block_size: int, local_blocks: int, causal: bool, branch_score: str,
                key_block_size: int | None = None, query_samples: int = 0, scale: float = 1.0):
    """HiP's tree search per query block: the visible key blocks in ``top_k`` equal ranges; at every
    level each range splits into two halves, every half is scored (:func:`hip_branch_score`) and
    the ``top_k`` best halves survive, until each range is one block; the always-visited blocks are
    added. ``query_samples`` r > 0: r evenly spaced queries of the block score instead of all."""
    B, H, nq, _ = q.shape
    k = expand_heads(k, H)
    nk, bq = k.shape[2], block_size
    bk = key_block_size or block_size
    width = min(top_k, math.ceil(nk / bk))
    blocks = {}
    for bi in range(B):
        for h in range(H):
            for i in range(math.ceil(nq / bq)):
                diag = diagonal_block(i, bq, nq, nk, causal, bk)
                visible = max(diag + 1, 0)
                positions = spread_rows(i, bq, nq, query_samples) if query_samples else list(range(i * bq, min(nq, (i + 1) * bq)))
                queries = q[bi, h, positions]
                ranges = [(t * visible // width, (t + 1) * visible // width) for t in range(width)]
                ranges = [r for r in ranges if r[1] > r[0]]
                while any(hi - lo > 1 for lo, hi in ranges):
                    halves = []
                    for lo, hi in ranges:
                        mid = (lo + hi + 1) // 2
                        halves += [r for r in ((lo, mid), (mid, hi)) if r[1] > r[0]]
                    scored = [(hip_branch_score(branch_score, queries, positions, k[bi, h], lo, hi, bk, nq, nk, causal,
                                                sampled=query_samples > 0), (lo, hi))
                              for lo, hi in halves]
                    scored.sort(key=lambda s: -s[0])
                    ranges = [r for _, r in scored[:width]]
                found = [lo for lo, _ in ranges]
                blocks[bi, h, i] = sorted(set(found) | set(always_visited(diag, causal, local_blocks)))
    return block_support(blocks, (B, H, nq, nk), bq, causal, bk)


# ---- MInference vertical-slash -----------------------------------------------------------------
def top_ids(scores: dict, count: int) -> list:
    """The ``count`` keys of ``scores`` with the highest values."""
    return sorted(scores, key=lambda x: -scores[x])[:count]


def vertical_slash_support(q, k, *, vertical_blocks: int, slash_blocks: int, block_size: int, local_blocks: int,
                           last_q: int, vertical_columns: int, causal: bool, scale: float, estimate_queries: str = "last"):
    """MInference's estimate: the last ``last_q`` queries (``estimate_queries="spread"``, not the
    paper's: ``last_q`` queries evenly spread over the sequence) attend densely (causal); their attention
    summed per key is the vertical score, summed per diagonal (query position - key position) the
    slash score. At block granularity a key block's vertical score sums its keys, a block
    diagonal d sums the token diagonals in [(d - 1) b, (d + 1) b); block 0 and diagonals 0 ..
    ``local_blocks`` always win. Every query block visits the chosen vertical blocks, the key block
    at each chosen block distance from its diagonal block, and the ``vertical_columns`` single keys
    with the most vertical score outside the vertical blocks."""
    assert causal, "vertical_slash is causal only"
    B, H, nq, _ = q.shape
    k = expand_heads(k, H)
    nk, b = k.shape[2], block_size
    nkb, off = math.ceil(nk / b), nk - nq
    support = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    for bi in range(B):
        for h in range(H):
            vertical, slash = [0.0] * nk, [0.0] * nk
            n = min(last_q, nq)
            estimating = range(nq - n, nq) if estimate_queries == "last" else [round(j * (nq - 1) / max(n - 1, 1)) for j in range(n)]
            for p in estimating:
                reach = p + off
                if reach < 0:
                    continue
                weights = torch.softmax((k[bi, h, : reach + 1].double() @ q[bi, h, p].double()) * scale, 0)
                for j in range(reach + 1):
                    vertical[j] += float(weights[j])
                    slash[reach - j] += float(weights[j])
            v_score = {kb: sum(vertical[kb * b : (kb + 1) * b]) for kb in range(nkb)}
            s_score = {d: sum(slash[max(0, (d - 1) * b) : (d + 1) * b]) for d in range(nkb)}
            v_score[0] = math.inf
            for d in range(min(local_blocks + 1, nkb)):
                s_score[d] = math.inf
            verticals = top_ids(v_score, min(vertical_blocks, nkb))
            distances = top_ids(s_score, min(slash_blocks, nkb))
            outside = {j: vertical[j] for j in range(nk) if j // b not in verticals}
            columns = top_ids(outside, min(vertical_columns, nk)) if vertical_columns else []
            for i in range(math.ceil(nq / b)):
                diag = diagonal_block(i, b, nq, nk, True)
                chosen = {v for v in verticals if v <= diag} | {diag - d for d in distances if diag - d >= 0}
                for p in range(i * b, min(nq, (i + 1) * b)):
                    for j in [j for kb in chosen for j in range(kb * b, min(nk, (kb + 1) * b))] + columns:
                        support[bi, h, p, j] = j <= p + off
    return support


# ---- BiFormer ----------------------------------------------------------------------------------
def region_of(token: int, grid: tuple[int, ...], n_win: int) -> int:
    """The region (row-major over the n_win x n_win windows; a chunk in 1-D) holding ``token``."""
    if len(grid) == 1:
        return token // (grid[0] // n_win)
    row, col = divmod(token, grid[1])
    return (row // (grid[0] // n_win)) * n_win + col // (grid[1] // n_win)


def biformer_support(q, k, *, n_win: int, topk: int, grid: tuple[int, ...] | None, causal: bool, scale: float):
    """BiFormer's bi-level routing: region queries and keys are the means of their tokens' q and k
    (all heads concatenated), the region affinity is their dot product, each region keeps its
    ``topk`` regions of highest affinity and its tokens attend to every token of those."""
    B, H, n, _ = q.shape
    k = expand_heads(k, H)
    grid = grid or (n,)
    regions = n_win ** len(grid)
    members = [[t for t in range(n) if region_of(t, grid, n_win) == r] for r in range(regions)]
    support = torch.zeros(B, H, n, n, dtype=torch.bool)
    for bi in range(B):
        qr = [torch.cat([q[bi, h, m].double().mean(0) for h in range(H)]) for m in members]
        kr = [torch.cat([k[bi, h, m].double().mean(0) for h in range(H)]) for m in members]
        for r in range(regions):
            routed = top_ids({s: float(qr[r] @ kr[s]) for s in range(regions)}, min(topk, regions))
            keys = [t for s in routed for t in members[s]]
            for t in members[r]:
                support[bi, :, t, keys] = True
    return support


# ---- S2-Attention ------------------------------------------------------------------------------
def s2_support(q, k, *, block_size: int, local_blocks: int, vert_stride: int, causal: bool, scale: float):
    """DKernel's local-stride pattern as S2-Attention shards it: head h sees the ``local_blocks``
    key blocks nearest its query's block and every key block kb with
    (kb + h * max(1, vert_stride // H) + 1) % vert_stride == 0, so the heads hold different strided
    shards of the context."""
    B, H, nq, _ = q.shape
    nk, b = k.shape[2], block_size
    support = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    step = max(1, vert_stride // H)
    for h in range(H):
        for p in range(nq):
            pos = p + nk - nq
            for j in range(nk):
                near = 0 <= pos // b - j // b < local_blocks if causal else abs(pos // b - j // b) < local_blocks
                shard = (j // b + h * step + 1) % vert_stride == 0
                support[:, h, p, j] = (near or shard) and sees(p, j, nq, nk, causal)
    return support


# ---- Routing Transformer -----------------------------------------------------------------------
def routing_support(q, k, *, num_clusters: int, iterations: int, seed: int, window: int | None, causal: bool, scale: float):
    """Routing attention with balanced clusters: unit queries and keys; spherical k-means (each
    token to its most similar centroid, each centroid the normalised sum of its tokens, kept when
    empty) started farthest-first from the token ``randint(seed)`` draws; then each centroid takes its
    ``window`` (default ceil(N / C)) most similar queries and keys, and a query attends to every
    key that shares a cluster with it. In float32, as the method routes."""
    B, H, nq, _ = q.shape
    k = expand_heads(k, H)
    nk = k.shape[2]
    support = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    for bi in range(B):
        for h in range(H):
            qn = [x / x.norm() for x in q[bi, h].float()]
            kn = [x / x.norm() for x in k[bi, h].float()]
            tokens = qn + kn
            count = min(num_clusters, len(tokens))
            centroids = [tokens[int(torch.randint(len(tokens), (1,), generator=torch.Generator().manual_seed(seed)))]]
            while len(centroids) < count:  # farthest-first: the token least similar to its nearest centroid
                centroids.append(tokens[min(range(len(tokens)), key=lambda t: max(float(tokens[t] @ c) for c in centroids))])
            for _ in range(iterations):
                sums = [torch.zeros_like(c) for c in centroids]
                for t in tokens:
                    sums[max(range(count), key=lambda c: float(t @ centroids[c]))] += t
                centroids = [s / s.norm() if float(s.norm()) > 0 else c for s, c in zip(sums, centroids)]
            wq, wk = min(window or math.ceil(nq / count), nq), min(window or math.ceil(nk / count), nk)
            for c in centroids:
                queries = top_ids({i: float(qn[i] @ c) for i in range(nq)}, wq)
                keys = top_ids({j: float(kn[j] @ c) for j in range(nk)}, wk)
                for i in queries:
                    support[bi, h, i, keys] = torch.tensor([sees(i, j, nq, nk, causal) for j in keys])
    return support


# ---- HyperAttention -----------------------------------------------------------------------------
def gray_position(code: int) -> int:
    """Position of ``code`` in the reflected Gray sequence (g -> g ^ g >> 1 inverted)."""
    position = 0
    while code:
        position ^= code
        code >>= 1
    return position


def lsh_order(x: torch.Tensor, planes: torch.Tensor) -> list[int]:
    """Tokens of x (N, D) sorted (stably) by the Gray position of their angular hash: bit i is
    whether the token lies on the positive side of hyperplane i."""
    codes = [sum(1 << i for i in range(planes.shape[1]) if float(t.float() @ planes[:, i]) > 0) for t in x]
    return sorted(range(len(codes)), key=lambda t: gray_position(codes[t]))


def hyper_weights(q, k, *, block_size: int, sample_size: int, num_projections: int, min_seq_len: int, seed: int,
                  causal: bool, scale: float) -> torch.Tensor:
    """(B, Hq, N, N) float64 log-weights of HyperAttention (arXiv 2310.05868), -inf off the
    support. Non-causal: sortLSH pairs a query with the keys of its block in the hash order
    (log-weight 0) and with ``sample_size`` uniformly sampled other keys (log(n / m)). Causal: the
    recursion splits a causal square into two causal halves and the off-diagonal rectangle (the
    non-causal case; an odd square's last row of it exactly), down to ``min_seq_len`` (exact).
    Random draws in the method's order: the hyperplanes, then one key sample per rectangle."""
    B, H, n, D = q.shape
    k = expand_heads(k, H)
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
                q_sorted = lsh_order(q[bi, h, q0 : q0 + size], planes)
                k_sorted = lsh_order(k[bi, h, k0 : k0 + size], planes)
                block_of_key = {key: rank // block_size for rank, key in enumerate(k_sorted)}
                for rank, query in enumerate(q_sorted):
                    row = weights[bi, h, q0 + query]
                    for key in samples:
                        if block_of_key[key] != rank // block_size:
                            row[k0 + key] = math.log(size / len(samples))
                    for key in k_sorted[(rank // block_size) * block_size : (rank // block_size + 1) * block_size]:
                        row[k0 + key] = 0.0

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


def weighted_attention(q, k, v, log_weights: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T scale + log_weights) v in float64."""
    k, v = expand_heads(k.double(), q.shape[1]), expand_heads(v.double(), q.shape[1])
    return torch.softmax((q.double() @ k.transpose(-1, -2)) * scale + log_weights, -1) @ v


# ---- SEA ---------------------------------------------------------------------------------------
def sea_support(q, k, *, top_k: int, q_block: int, proj: torch.Tensor, causal: bool, scale: float):
    """SEA's estimate, training-free: each query's row of Performer attention (features of
    q scale^0.5 and k scale^0.5, normalised over the keys it sees), averaged over a query block;
    the block keeps its own diagonal keys (positions first .. first + q_block - 1 shifted by
    Nk - Nq) and the ``top_k`` keys of highest estimate among the others (earlier ones when causal)."""
    B, H, nq, _ = q.shape
    k = expand_heads(k, H)
    nk, off = k.shape[2], k.shape[2] - nq
    support = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    for bi in range(B):
        for h in range(H):
            qf, kf = (positive_random_features(x[bi, h].double(), proj.double(), scale) for x in (q, k))
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
                keys = top_ids(others, top_k) + [j for j in range(first, first + q_block) if 0 <= j < nk and j - off < nq]
                for p in rows:
                    support[bi, h, p, keys] = torch.tensor([sees(p, j, nq, nk, causal) for j in keys])
    return support


# ---- SG-Former (the library's training-free reallocation) ---------------------------------------
def sgformer_runs(q, k, members: list[list[int]], num_tokens: int, scale: float) -> dict:
    """The library's default reallocation for one head: region means attend region means, a
    region's significance is the mass it receives; walking the tokens region by region, each
    carries its region's significance shared equally among the region's tokens and joins new token
    floor(M x significance carried before it / total). Returns {token: new token}."""
    qr = torch.stack([q[m].double().mean(0) for m in members])
    kr = torch.stack([k[m].double().mean(0) for m in members])
    significance = torch.softmax(qr @ kr.T * scale, -1).mean(0)
    total, carried, new_of = float(significance.sum()), 0.0, {}
    for r, m in enumerate(members):
        for t in m:
            new_of[t] = min(math.floor(num_tokens * carried / total), num_tokens - 1)
            carried += float(significance[r]) / len(m)
    return new_of


def sgformer_tiers(q, k, members: list[list[int]], num_tokens: int, scale: float) -> dict:
    """SG-Former's reallocation for one head, q/k (N, D): a token's significance is the mass every
    query puts on its region's mean key (global map over down-sampled keys) plus the mass its own
    region's queries put on it (local window map); tokens sorted by significance (stably, in
    region-major order) and the least significant quarter, middle half and top quarter cut into
    1 : 7 : 7 of the new tokens in equal runs. Returns {token: new token}."""
    kr = torch.stack([k[m].double().mean(0) for m in members])
    global_mass = torch.softmax(q.double() @ kr.T * scale, -1).mean(0)
    significance = {}
    for r, m in enumerate(members):
        local = torch.softmax(q[m].double() @ k[m].double().T * scale, -1).mean(0)
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


def sgformer_attention(q, k, v, *, n_win: int, num_tokens: int, grid: tuple[int, ...] | None, causal: bool, scale: float,
                       reallocation: str = "runs"):
    """SG-Former's attention: the tokens reallocated (:func:`sgformer_runs` or, the paper's,
    :func:`sgformer_tiers`), every query attends (exact softmax, float64) to the mean keys and
    values of the non-empty new tokens."""
    assert not causal
    B, H, n, _ = q.shape
    k, v = expand_heads(k, H), expand_heads(v, H)
    grid = grid or (n,)
    regions = n_win ** len(grid)
    members = [[t for t in range(n) if region_of(t, grid, n_win) == r] for r in range(regions)]
    out = torch.zeros(B, H, n, v.shape[-1], dtype=torch.float64)
    for bi in range(B):
        for h in range(H):
            if reallocation == "tiers":
                new_of = sgformer_tiers(q[bi, h], k[bi, h], members, num_tokens, scale)
            else:
                new_of = sgformer_runs(q[bi, h], k[bi, h], members, num_tokens, scale)
            groups = [[t for t in range(n) if new_of[t] == g] for g in range(num_tokens)]
            groups = [g for g in groups if g]
            kp = torch.stack([k[bi, h, g].double().mean(0) for g in groups])
            vp = torch.stack([v[bi, h, g].double().mean(0) for g in groups])
            out[bi, h] = torch.softmax(q[bi, h].double() @ kp.T * scale, -1) @ vp
    return out
