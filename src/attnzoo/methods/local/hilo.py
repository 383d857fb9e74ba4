"""HiLo attention (LITv2): some heads attend in local windows, the others to pooled keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import InvalidArgumentError, UnsupportedError, check_float, check_int
from ...kernels.block_sparse import BACKENDS
from ...kernels.dense import masked_attention, sdpa
from ...method import Call, Method, MethodInfo
from ...registry import register
from .base import SpatialConfig


@dataclass
class HiLoConfig(SpatialConfig):
    """``alpha``: fraction of query heads in the Lo-Fi group (attending to s x s average-pooled keys
    and values); the other (Hi-Fi) heads attend inside non-overlapping s x s windows; ``window`` = s
    (1: every head attends globally, as in LITv2)."""

    alpha: float = 0.5
    window: int = 2

    def __post_init__(self):
        super().__post_init__()
        self.alpha = check_float("alpha", self.alpha, low=0.0, high=1.0)
        self.window = check_int("window", self.window)


@register
class HiLo(Method):
    """HiLo attention ("Fast Vision Transformers with HiLo Attention", arXiv 2205.13213): heads
    split into Hi-Fi (window self-attention within s x s windows, run by maxvit_block on the shared
    block-sparse executor) and Lo-Fi (every query attends to the s x s average-pooled keys and values;
    pooling k = W_k pool(x) is LITv2's pooling of x, since projection is linear). Non-causal, 2-D
    grid, no global tokens. q (B, Hq, N, D), N = H * W; the last int(alpha * Hq) heads are Lo-Fi
    (LITv2's count), and with ``window=1`` every head is (plain global attention, as in LITv2)."""

    info = MethodInfo(
        name="hilo", title="Fast Vision Transformers with HiLo Attention", arxiv="2205.13213", family=("local",),
        causal=False, non_causal=True, cross=False, gqa=True, training_free=True,
        time="O(N s^2 D + N^2 D / s^2)", memory="O(N^2 / s^2) per Lo-Fi head", spatial=True,
        summary="Hi-Fi heads in local windows, Lo-Fi heads on average-pooled keys/values",
    )
    Config = HiLoConfig
    backends = BACKENDS

    def __init__(self, **config):
        super().__init__(**config)
        from .maxvit import MaxVitBlock

        self._hifi = MaxVitBlock(backend=self.backend, grid=self.config.grid, block_size=self.config.window)

    def _split(self, call: Call) -> tuple[int, int]:
        """(Hi-Fi query heads, Hi-Fi key/value heads)."""
        # LITv2: int(alpha H) Lo-Fi heads; window 1 makes every head Lo-Fi (global attention, no pooling)
        lo = call.heads_q if self.config.window == 1 else int(self.config.alpha * call.heads_q)
        hi = call.heads_q - lo
        if hi % call.groups:
            raise InvalidArgumentError(
                "alpha", f"a split of the {call.heads_q} query heads at a multiple of the GQA group size {call.groups}",
                f"{lo} Lo-Fi heads",
            )
        return hi, hi // call.groups

    def _grid(self, call: Call) -> tuple[int, int]:
        grid = self.config.grid
        if grid is None or len(grid) != 2:
            raise InvalidArgumentError("grid", "(H, W): HiLo works on a 2-D grid", grid)
        return grid

    def check(self, call: Call) -> None:
        if self.config.num_global:
            raise UnsupportedError("method 'hilo' has no global tokens; got num_global > 0")
        H, W = self._grid(call)
        if H * W != call.len_q:
            raise InvalidArgumentError("grid", f"a product equal to N = {call.len_q}", f"{(H, W)} (product {H * W})")
        s = self.config.window
        if H % s or W % s:
            raise InvalidArgumentError("window", f"a divisor of both grid sides {(H, W)}", s)
        self._split(call)

    def _pool(self, x: torch.Tensor, call: Call) -> torch.Tensor:
        """(B, H, N, D) -> (B, H, N / s^2, D): s x s average pooling on the grid."""
        (gh, gw), s = self._grid(call), self.config.window
        B, H, _, D = x.shape
        img = x.transpose(2, 3).reshape(B * H, D, gh, gw)
        return F.avg_pool2d(img, s).reshape(B, H, D, -1).transpose(2, 3)

    def _forward(self, q, k, v, call: Call):
        hi, hi_kv = self._split(call)
        parts = []
        if hi:
            parts.append(self._hifi(q[:, :hi], k[:, :hi_kv], v[:, :hi_kv], scale=call.scale, check_finite=False))  # checked once, above
        if hi < call.heads_q:
            kp, vp = self._pool(k[:, hi_kv:], call), self._pool(v[:, hi_kv:], call)
            parts.append(sdpa(q[:, hi:], kp, vp, causal=False, scale=call.scale))
        return torch.cat(parts, dim=1)

    def _reference(self, q, k, v, call: Call):
        hi, hi_kv = self._split(call)
        (_, gw), s = self._grid(call), self.config.window
        rows, cols = torch.arange(call.len_q) // gw, torch.arange(call.len_q) % gw
        window = (rows // s) * (gw // s) + cols // s
        parts = []
        if hi:
            same = (window[:, None] == window[None, :]).to(q.device)
            parts.append(masked_attention(q[:, :hi], k[:, :hi_kv], v[:, :hi_kv], same, scale=call.scale))
        if hi < call.heads_q:
            # pooled token w = mean of the keys in window w (written with an explicit averaging matrix)
            avg = (window[None, :] == torch.arange(call.len_q // (s * s))[:, None]).to(k.dtype).to(k.device) / (s * s)
            kp, vp = avg @ k[:, hi_kv:], avg @ v[:, hi_kv:]
            parts.append(masked_attention(q[:, hi:], kp, vp, None, scale=call.scale))
        return torch.cat(parts, dim=1)
