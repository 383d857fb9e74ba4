"""CLEAR: a circular local window on the latent grid of a diffusion transformer, optionally with
down-sampled keys and values."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import InvalidArgumentError, UnsupportedError, check_float, check_int
from ...kernels.block_sparse.builders import box_layout, tile_shape
from ...kernels.dense import attention_with_lse, masked_attention, merge_attention
from ...method import Call, MethodInfo
from ...registry import register
from .base import SpatialConfig, SpatialMethod


@dataclass
class ClearConfig(SpatialConfig):
    """``radius``: keys at Euclidean distance strictly below it (in grid cells) of the query are
    visible (the official mask ``dist^2 < r^2``: 193 keys at r = 8); ``down_factor``: f > 1 adds
    the grid's keys and values average-pooled over f x f cells, which every grid query also attends
    to under the same softmax (the official ``down_factor`` variants; 1: none)."""

    radius: float = 8.0
    down_factor: int = 1

    def __post_init__(self):
        super().__post_init__()
        self.radius = check_float("radius", self.radius, low=0.0, high=float("inf"), low_open=True)
        self.down_factor = check_int("down_factor", self.down_factor)


@register
class Clear(SpatialMethod):
    """Each grid token attends to the keys strictly inside a circle of ``radius`` around it
    (truncated at the borders), and the ``num_global`` leading tokens (a DiT's text tokens) attend
    to and are attended by everything ("CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion
    Transformers Up", arXiv 2412.16112). With ``down_factor`` f > 1 grid queries also attend to the
    f x f average-pooled grid keys/values (2-D grids). CLEAR fine-tunes the model to the window
    (``training_free`` False). q, k, v (B, H, N, D), N = num_global + prod(grid)."""

    info = MethodInfo(
        name="clear", title="CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up", arxiv="2412.16112",
        family=("local", "learned"), causal=False, non_causal=True, cross=False, gqa=True, training_free=False,
        time="O(N r^2 D + N^2 D / f^2)", memory="O(N r^2) bools of cached mask", spatial=True,
        summary="circular local window on the 2-D grid, global (text) tokens kept, optional down-sampled keys",
    )
    Config = ClearConfig
    ndims = (2, 3)

    def check_grid(self, grid, call: Call) -> None:
        f = self.config.down_factor
        if f > 1:
            if len(grid) != 2:
                raise UnsupportedError(f"clear down_factor={f} pools a 2-D grid; got grid={grid}")
            if grid[0] % f or grid[1] % f:
                raise InvalidArgumentError("down_factor", f"a divisor of both grid sides {grid}", f)

    def mask_mod(self, call: Call):
        r2 = self.config.radius ** 2

        def inner(h, qc, kc):
            dist2 = sum((a - b) ** 2 for a, b in zip(qc, kc))
            return dist2 < r2

        return self.with_globals(call, inner)

    def build_layout(self, call: Call):
        grid, r = self.grid(call), int(self.config.radius)
        spans = [lambda c: (c - r, c + r + 1)] * len(grid)
        return box_layout(grid, self.config.num_global, tile_shape(grid), spans, call.device)

    def reference_mask(self, call: Call) -> torch.Tensor:
        grid = self.grid(call)
        coords = torch.cartesian_prod(*[torch.arange(n, dtype=torch.float64) for n in grid]).view(-1, len(grid))
        dist2 = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1)  # exact on integer cells
        return self.embed_grid_mask(call, dist2 < self.config.radius ** 2)

    # ---- the down-sampled keys and values ------------------------------------------------------
    def _pooled(self, x: torch.Tensor, call: Call) -> torch.Tensor:
        """(B, H, N, D) -> (B, H, prod(grid) / f^2, D): the grid tokens average-pooled over f x f cells."""
        (rows, cols), f, g = self.grid(call), self.config.down_factor, self.config.num_global
        img = x[:, :, g:].transpose(2, 3).reshape(x.shape[0] * x.shape[1], x.shape[3], rows, cols)
        return F.avg_pool2d(img, f).reshape(x.shape[0], x.shape[1], x.shape[3], -1).transpose(2, 3)

    def _with_pooled(self, out, lse, q, k, v, call: Call):
        """Merge the grid queries' window attention (out, lse) with their attention to the pooled keys."""
        g = self.config.num_global
        pooled_out, pooled_lse = attention_with_lse(q[:, :, g:], self._pooled(k, call), self._pooled(v, call), scale=call.scale)
        grid_out, grid_lse = merge_attention([out[:, :, g:], pooled_out], [lse[:, :, g:], pooled_lse])
        return torch.cat([out[:, :, :g], grid_out.to(out.dtype)], dim=2), torch.cat([lse[:, :, :g], grid_lse.to(lse.dtype)], dim=2)

    def _run(self, q, k, v, call: Call, return_lse: bool):
        if self.config.down_factor == 1:
            return super()._run(q, k, v, call, return_lse)
        out, lse, counts = super()._run(q, k, v, call, return_lse=True)
        out, lse = self._with_pooled(out, lse, q, k, v, call)
        pairs = (call.len_q - self.config.num_global) * (call.len_kv - self.config.num_global) // self.config.down_factor ** 2
        pairs *= call.batch * call.heads_q
        counts = {**counts, "computed": counts["computed"] + pairs,
                  "allowed": None if counts.get("allowed") is None else counts["allowed"] + pairs}
        return out, lse if return_lse else None, counts

    def _forward_with_lse(self, q, k, v, call: Call):
        if self.config.down_factor > 1 and torch.compiler.is_compiling():
            raise UnsupportedError("clear down_factor > 1 does not run under torch.compile (its pooled keys are merged eagerly)")
        return super()._forward_with_lse(q, k, v, call)

    def _masked_forward(self, q, k, v, call: Call):
        if self.config.down_factor > 1:
            raise UnsupportedError("clear down_factor > 1 does not run under torch.compile (its pooled keys are merged eagerly)")
        return super()._masked_forward(q, k, v, call)

    def _reference(self, q, k, v, call: Call):
        if self.config.down_factor == 1:
            return super()._reference(q, k, v, call)
        (rows, cols), f, g = self.grid(call), self.config.down_factor, self.config.num_global
        r, c = torch.arange(rows * cols) // cols, torch.arange(rows * cols) % cols
        cell = (r // f) * (cols // f) + c // f  # the pooled token each grid token falls in
        average = (cell[None, :] == torch.arange(rows * cols // f ** 2)[:, None]).to(k.dtype).to(k.device) / f ** 2
        keys, values = torch.cat([k, average @ k[:, :, g:]], dim=2), torch.cat([v, average @ v[:, :, g:]], dim=2)
        pooled_seen = torch.zeros(call.len_q, average.shape[0], dtype=torch.bool, device=q.device)
        pooled_seen[g:] = True  # grid queries see every pooled token; global queries the original keys only
        return masked_attention(q, keys, values, torch.cat([self.reference_mask(call), pooled_seen], dim=1), scale=call.scale)

    def _support(self, q, k, v, call: Call):
        """The window's pairs; None with pooled keys (every grid query sees a summary of every key)."""
        return super()._support(q, k, v, call) if self.config.down_factor == 1 else None
