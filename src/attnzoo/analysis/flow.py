"""Attention rollout and attention flow (Abnar & Zuidema, 2020) and VL-SAM's regularised flow
(Lin et al., NeurIPS 2024), on per-layer attention probabilities (B?, H, N, N).

Each layer's heads are fused into one (B, N, N) map (``"mean"``, ``"max"``, ``"min"``, or
VL-SAM's weighted mean ``"vlsam"``). With ``residual`` the map becomes 0.5 A + 0.5 I, rows
renormalised: the skip connection carries each token to itself. Rollout multiplies the maps
layer by layer; flow treats them as edge capacities of a layered graph and takes the maximum flow
from an output token to each input token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InvalidArgumentError, check_float
from ..progress import progress
from ._checks import check_layers

FUSIONS = ("mean", "max", "min", "vlsam")


def vlsam_head_weights(probs: torch.Tensor) -> torch.Tensor:
    """(B, H) VL-SAM head weights of (B, H, Nq, Nk) maps, W = Mean(Max(S, keys), queries): each
    query's largest attention weight, averaged over the queries; sharply focused heads weigh more."""
    return probs.amax(dim=-1).mean(dim=-1)


def fuse_heads(probs: torch.Tensor, fusion: str = "mean") -> torch.Tensor:
    """(B, H, N, N) -> (B, N, N): the heads fused by ``fusion`` (one of :data:`FUSIONS`)."""
    if fusion == "mean":
        return probs.mean(dim=1)
    if fusion == "max":
        return probs.amax(dim=1)
    if fusion == "min":
        return probs.amin(dim=1)
    if fusion == "vlsam":
        return (probs * vlsam_head_weights(probs)[..., None, None]).mean(dim=1)
    raise InvalidArgumentError("fusion", f"one of {FUSIONS}", repr(fusion))


def _row_normalise(a: torch.Tensor) -> torch.Tensor:
    return a / a.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def layer_maps(maps: Sequence[torch.Tensor], *, fusion: str, residual: bool, discard_ratio: float = 0.0) -> list[torch.Tensor]:
    """Per layer, the fused (B, N, N) float64 map: heads fused, the weakest ``discard_ratio`` of
    each row's entries zeroed (never the diagonal), the residual identity added, rows renormalised."""
    layers = check_layers("maps", maps)
    n = layers[0].shape[-1]
    if layers[0].shape[-2] != n:
        raise InvalidArgumentError("maps", "self-attention maps (Nq == Nk)", tuple(layers[0].shape))
    ratio = check_float("discard_ratio", discard_ratio, low=0.0, high=1.0)
    if ratio == 1.0:
        raise InvalidArgumentError("discard_ratio", "a number in [0, 1) (1 discards every entry)", ratio)
    eye = torch.eye(n, dtype=torch.float64, device=layers[0].device)
    out = []
    for probs in layers:
        a = fuse_heads(probs.double(), fusion)
        drop = int(ratio * n)
        if drop:
            weakest = (a + 2.0 * eye).topk(drop, dim=-1, largest=False).indices
            a = a.scatter(-1, weakest, 0.0)
        out.append(_row_normalise(0.5 * a + 0.5 * eye) if residual else _row_normalise(a))
    return out


def rollout(maps: Sequence[torch.Tensor], *, fusion: str = "mean", discard_ratio: float = 0.0, residual: bool = True) -> torch.Tensor:
    """(B, N, N) attention rollout of per-layer maps (first layer first): ``[b, i, j]`` is how much
    output token i draws on input token j, the product of the fused maps; rows sum to one."""
    fused = layer_maps(maps, fusion=fusion, residual=residual, discard_ratio=discard_ratio)
    joint = fused[0]
    for a in fused[1:]:
        joint = a @ joint
    return joint.float()


def max_flow(capacity: np.ndarray, source: int, sink: int) -> tuple[float, np.ndarray]:
    """Maximum flow from ``source`` to ``sink`` in a graph with (V, V) non-negative ``capacity``
    (shortest augmenting paths, Edmonds-Karp). Returns the value and the (V, V) flow, which is
    within capacity on every edge and conserved at every other node."""
    cap = np.asarray(capacity, dtype=np.float64)
    if cap.ndim != 2 or cap.shape[0] != cap.shape[1] or (cap < 0).any():
        raise InvalidArgumentError("capacity", "a square matrix of non-negative capacities", cap.shape)
    flow = np.zeros_like(cap)
    tol = 1e-12 * max(1.0, float(cap.max(initial=0.0)))
    while True:
        residual = cap - flow + flow.T
        parent = np.full(len(cap), -1)
        parent[source] = source
        frontier = [source]
        while frontier and parent[sink] < 0:
            reach = residual[frontier] > tol  # (len(frontier), V)
            reach &= (parent < 0)[None, :]
            hit_rows, hit_nodes = np.nonzero(reach)
            nodes, first = np.unique(hit_nodes, return_index=True)
            parent[nodes] = np.asarray(frontier)[hit_rows[first]]
            frontier = nodes.tolist()
        if parent[sink] < 0:
            return float(flow[source].sum() - flow[:, source].sum()), flow
        path, node = [], sink
        while node != source:
            path.append((parent[node], node))
            node = parent[node]
        push = min(residual[u, v] for u, v in path)
        for u, v in path:
            back = min(push, flow[v, u])  # cancel reverse flow first
            flow[v, u] -= back
            flow[u, v] += push - back


def flow_graph(fused: Sequence[torch.Tensor], batch: int) -> np.ndarray:
    """(V, V) capacities, V = (L + 1) N: node l N + i is token i after layer l (layer 0 = the
    input); the edge from token i after layer l + 1 down to token j after layer l carries
    ``fused[l][batch, i, j]``."""
    n, n_layers = fused[0].shape[-1], len(fused)
    cap = np.zeros(((n_layers + 1) * n,) * 2)
    for layer, a in enumerate(fused):
        cap[(layer + 1) * n:(layer + 2) * n, layer * n:(layer + 1) * n] = a[batch].cpu().numpy()
    return cap


def attention_flow(maps: Sequence[torch.Tensor], *, fusion: str = "mean", residual: bool = True,
                   outputs: Sequence[int] | None = None, show_progress: bool = False) -> torch.Tensor:
    """(B, len(outputs), N) attention flow: ``[b, o, j]`` is the maximum flow from output token
    ``outputs[o]`` (default all) after the last layer to input token j, the fused maps of
    :func:`layer_maps` as capacities. Costs one max-flow per (output, input) pair: for short inputs
    (``show_progress``: a bar over the pairs)."""
    fused = layer_maps(maps, fusion=fusion, residual=residual)
    b, n = fused[0].shape[0], fused[0].shape[-1]
    chosen = list(range(n)) if outputs is None else [int(o) for o in outputs]
    for o in chosen:
        if not 0 <= o < n:
            raise InvalidArgumentError("outputs", f"token positions in [0, {n - 1}]", o)
    top = len(fused) * n
    out = torch.zeros(b, len(chosen), n)
    graphs = [flow_graph(fused, batch) for batch in range(b)]
    pairs = [(batch, row, j) for batch in range(b) for row in range(len(chosen)) for j in range(n)]
    for batch, row, j in progress(pairs, "attention flow", enabled=show_progress):
        out[batch, row, j] = max_flow(graphs[batch], top + chosen[row], j)[0]
    return out


def regularized_flow(maps: Sequence[torch.Tensor], *, fusion: str = "vlsam") -> torch.Tensor:
    """(B, N, N) VL-SAM's regularised attention flow. Per layer the heads are fused (default the
    VL-SAM head weighting) and, against the causal mask's pull towards early tokens, column j is
    scaled by 1 - (n_j - 1) / N, n_j the number of queries that attend key j at all; the layers
    are then multiplied as in :func:`rollout` without the residual. Row i is query i's map."""
    fused = layer_maps(maps, fusion=fusion, residual=False)
    n = fused[0].shape[-1]
    joint = None
    for a in fused:
        seen_by = (a > 0).sum(dim=-2, keepdim=True).double()  # (B, 1, N)
        a = a * (1.0 - (seen_by - 1.0).clamp(min=0.0) / n)
        joint = a if joint is None else a @ joint
    return joint.float()
