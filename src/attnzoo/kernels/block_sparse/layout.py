"""The block layout: which key blocks each query block visits, plus a per-token mask.

A layout is the whole description of a sparse pattern, in the FlexAttention sense: attention from
query token i to key token j is allowed where j's block is listed for i's block *and* ``mask_mod``
says so. Tokens may be visited in another order (``q_order``, ``kv_order``: position -> original
index), so that a 2-D/3-D window becomes a tile and a dilated or strided pattern becomes contiguous
(the trick NATTEN and attention-gym use). A ``q_order`` may also cover only some queries (a DiT's
grid tokens, without its global text tokens); executors return zeros for the rows it leaves out.

Shapes: ``kv_indices`` (Bl, Hl, nQB, maxK) and ``kv_counts`` (Bl, Hl, nQB), with Bl in {1, B} and
Hl in {1, Hq}; block ids refer to positions in the visiting order; optional ``columns`` (Bl, Hl, C):
single key tokens every query block visits besides its blocks (MInference's vertical lines),
natural order only, -1 holes; ``mask_mod`` receives
original token indices as broadcastable int64 tensors, and the layout's own batch and head index
(0 where Bl or Hl is 1: a mask that differs between heads needs a per-head layout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def membership(ids: torch.Tensor, size: int) -> torch.Tensor:
    """Id lists (..., K) in [0, size) with negative holes -> (..., size) bool: which ids appear."""
    present = torch.zeros(*ids.shape[:-1], size + 1, dtype=torch.bool, device=ids.device)
    return present.scatter_(-1, torch.where(ids >= 0, ids, size), True)[..., :size]


def present_ids(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., n) bool -> the positions that are True, increasing (..., max count, at least 1; the
    other positions fill the rest), and their counts (...): a membership mask back to id lists."""
    counts = present.sum(-1)
    ids = torch.sort((~present).to(torch.int8), dim=-1, stable=True).indices
    return ids[..., : max(int(counts.max()), 1) if counts.numel() else 1].contiguous(), counts


@dataclass(eq=False)
class BlockLayout:
    num_q: int
    num_kv: int
    q_block: int
    kv_block: int
    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    mask_mod: MaskMod | None = None
    q_order: torch.Tensor | None = None
    kv_order: torch.Tensor | None = None
    covers_mask: bool = False
    """True when the listed blocks include every (i, j) that ``mask_mod`` allows, so executors may
    visit a superset of the blocks and rely on ``mask_mod`` alone (pattern methods); False when the
    listed blocks are a selection that ``mask_mod`` only refines (dynamic methods)."""
    boxes: Any = None
    """Optional geometry (:class:`~attnzoo.kernels.block_sparse.strip.Boxes2D`) of a tiled 2-D
    layout, which lets the CPU executor read each tile's keys through strided views."""
    columns: torch.Tensor | None = None
    """Optional (Bl, Hl, C) key token ids (-1 holes) that every query block also visits where
    ``mask_mod`` allows, on top of its listed blocks; natural order only."""
    cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.kv_indices.dim() != 4 or self.kv_counts.shape != self.kv_indices.shape[:3]:
            raise ValueError(
                f"BlockLayout: kv_indices must be (Bl, Hl, nQB, maxK) and kv_counts (Bl, Hl, nQB); got "
                f"{tuple(self.kv_indices.shape)} and {tuple(self.kv_counts.shape)}"
            )
        if self.kv_indices.shape[2] != self.num_q_blocks:
            raise ValueError(f"BlockLayout: {self.kv_indices.shape[2]} query blocks listed, expected {self.num_q_blocks}")
        for name, order, n in (("q_order", self.q_order, self.num_q), ("kv_order", self.kv_order, self.num_kv)):
            if order is not None and order.shape != (n,):
                raise ValueError(f"BlockLayout: {name} must have shape ({n},); got {tuple(order.shape)}")
        if self.columns is not None:
            if self.columns.dim() != 3 or self.columns.shape[:2] != self.kv_indices.shape[:2]:
                raise ValueError(f"BlockLayout: columns must be (Bl, Hl, C) = {tuple(self.kv_indices.shape[:2])} + (C,); "
                                 f"got {tuple(self.columns.shape)}")
            if self.q_order is not None or self.kv_order is not None or self.covers_mask:
                raise ValueError("BlockLayout: columns need a selection layout in natural token order "
                                 "(no q_order or kv_order, covers_mask False)")

    @property
    def num_q_blocks(self) -> int:
        return -(-self.num_q // self.q_block)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.num_kv // self.kv_block)

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def block_density(self) -> float:
        """Fraction of query-block x key-block pairs visited (averaged over batch and heads)."""
        return float(self.kv_counts.float().mean()) / self.num_kv_blocks

    def slot_valid(self) -> torch.Tensor:
        """(Bl, Hl, nQB, maxK) bool: slot s is a listed block (s < count)."""
        slots = torch.arange(self.kv_indices.shape[-1], device=self.device)
        return slots < self.kv_counts[..., None]

    def block_visits(self) -> torch.Tensor:
        """(Bl, Hl, nQB, nKB) bool: key block kb is listed for query block qb."""
        nkb = self.num_kv_blocks
        return membership(torch.where(self.slot_valid(), self.kv_indices.clamp(min=0, max=nkb - 1), -1), nkb)

    def column_tokens(self) -> torch.Tensor:
        """(Bl, Hl, num_kv) bool: key token j is one of the layout's ``columns``."""
        return membership(self.columns, self.num_kv)

    def column_visits(self) -> torch.Tensor:
        """(Bl, Hl, nQB, C) bool: column c is real, not a repeat of an earlier one, and its key
        block is not listed for query block qb (the columns a query block visits on top of its
        blocks)."""
        cols = self.columns
        ordered, perm = torch.sort(cols, dim=-1, stable=True)
        repeat = torch.zeros_like(cols, dtype=torch.bool).scatter_(-1, perm[..., 1:], ordered[..., 1:] == ordered[..., :-1])
        listed = self.block_visits()
        inside = torch.gather(listed, -1, (cols.clamp(min=0) // self.kv_block)[:, :, None, :].expand(-1, -1, listed.shape[2], -1))
        return ((cols >= 0) & ~repeat)[:, :, None, :] & ~inside

    @staticmethod
    def _original(order: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """Map positions in a visiting order to original token indices (-1 stays -1)."""
        if order is None:
            return positions
        return torch.where(positions >= 0, order[positions.clamp(min=0)], positions)

    def q_tokens(self) -> torch.Tensor:
        """(nQB, q_block) original query indices of each block, -1 for padding."""
        pos = torch.arange(self.num_q_blocks * self.q_block, device=self.device).view(-1, self.q_block)
        return self._original(self.q_order, torch.where(pos < self.num_q, pos, -1))

    def kv_tokens(self) -> torch.Tensor:
        """(Bl, Hl, nQB, maxK * kv_block) original key indices visited by each block, -1 for padding."""
        offs = torch.arange(self.kv_block, device=self.device)
        pos = self.kv_indices[..., None] * self.kv_block + offs
        pos = torch.where(self.slot_valid()[..., None] & (pos < self.num_kv), pos, -1)
        return self._original(self.kv_order, pos.flatten(-2))

    def token_mask(self, q_idx: torch.Tensor, kv_idx: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Allowed entries for broadcastable original indices (-1 = padding, never allowed)."""
        allowed = (q_idx >= 0) & (kv_idx >= 0)
        if self.mask_mod is not None:
            allowed = allowed & self.mask_mod(b, h, q_idx.clamp(min=0), kv_idx.clamp(min=0))
        return allowed

    def dense_mask(self, len_q: int, len_kv: int) -> torch.Tensor:
        """(Bl, Hl, len_q, len_kv) bool mask this layout means, in original order; materialises
        N x N, for references and tests only. Queries the layout does not visit get no keys."""
        Bl, Hl = self.kv_indices.shape[:2]
        visit = self.block_visits().repeat_interleave(self.q_block, 2).repeat_interleave(self.kv_block, 3)
        visit = visit[:, :, : self.num_q, : self.num_kv]
        qo = torch.arange(self.num_q, device=self.device) if self.q_order is None else self.q_order
        ko = torch.arange(self.num_kv, device=self.device) if self.kv_order is None else self.kv_order
        full = torch.zeros(Bl, Hl, len_q, len_kv, dtype=torch.bool, device=self.device)
        real = qo >= 0  # a q_order may hold -1 holes (padding of ragged tiles)
        full[:, :, qo[real][:, None], ko[None, :]] = visit[:, :, real]
        if self.columns is not None:  # natural order: every visited query row gets them
            full[:, :, : self.num_q, : self.num_kv] |= self.column_tokens()[:, :, None, :]
        qi = torch.arange(len_q, device=self.device)[:, None]
        ki = torch.arange(len_kv, device=self.device)[None, :]
        b = torch.arange(Bl, device=self.device).view(-1, 1, 1, 1)
        h = torch.arange(Hl, device=self.device).view(1, -1, 1, 1)
        return full & self.token_mask(qi, ki, b, h)
