"""Rotary position embeddings (RoPE, Su et al. 2021) over the (time, height, width) axes of video tokens.

The head dimension is seen as head_dim / 2 rotation pairs. The pairs are split into three groups:
the first group rotates with the token's frame index t, the second with its row h, the third with
its column w. Each group has its own frequency ladder theta ** (-i / n_pairs_of_group). A query and
a key then score as a function of (t_q - t_k, h_q - h_k, w_q - w_k) only.

Pair convention ("rotate half"): for x of size head_dim, pair i is (x[i], x[i + head_dim/2]).

Precision at long horizons. t is the absolute frame index and may pass 1e5 frames in a long
rollout. In float32 the angle t * freq keeps about 7 significant digits, so at t = 1e5 it is off by
up to ~4e-3 rad, and a rotated query/key pair stops being a function of t_q - t_k alone: streaming
and a parallel pass started at another offset would disagree. The time angles are therefore formed
and passed through cos/sin in float64 (on the CPU, or on the device when it supports float64); only
the resulting cos/sin values, which lie in [-1, 1], are cast down, where float32 keeps ~6e-8
absolute error. The time table is only (frames x time pairs) large, so float64 costs nothing. The
spatial angles are bounded by the grid size and need no such care.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def split_rotary_pairs(head_dim: int) -> tuple[int, int, int]:
    """Default split of the head_dim / 2 rotation pairs into (time, height, width) groups.

    Height and width get equal shares, time gets the remainder (so it is never the smallest):
    head_dim 32 -> (6, 5, 5) pairs, head_dim 64 -> (12, 10, 10).
    """
    if head_dim % 2 != 0 or head_dim < 6:
        raise ValueError(f"RoPE over (t, h, w) needs an even head_dim >= 6, got {head_dim}")
    n_pairs = head_dim // 2
    spatial = n_pairs // 3
    return n_pairs - 2 * spatial, spatial, spatial


def _inv_freq(n_pairs: int, theta: float, device: torch.device) -> torch.Tensor:
    """(n_pairs,) float64 frequencies theta ** (-i / n_pairs), i = 0 .. n_pairs - 1."""
    return theta ** (-torch.arange(n_pairs, dtype=torch.float64, device=device) / max(n_pairs, 1))


def _float64_device(device: torch.device) -> torch.device:
    # MPS (and some other backends) have no float64: build the small table on the CPU and move it.
    return device if device.type in ("cpu", "cuda") else torch.device("cpu")


class VideoRoPE(nn.Module):
    """Cos/sin tables for 3-axis RoPE on frames of `grid = (H, W)` tokens in row-major order.

    Holds no parameters and no buffers (a float64 buffer would be cast by `model.half()`); the
    spatial table is cached per device, and the last few full tables per (frames, device, dtype):
    a streamed frame asks for the same table once per denoiser call and once more to commit.

    Args:
        head_dim: per-head channel count (even).
        grid: (H, W) token grid of one frame; token n of a frame sits at (n // W, n % W).
        theta_t: frequency base of the time axis. Positions reach 1e5+ frames; the largest
            wavelength is 2 pi theta_t frames.
        theta_hw: frequency base of the two spatial axes (grids are small, so a small base keeps
            every spatial frequency distinguishable over a few tokens).
        pairs: (time, height, width) rotation-pair counts summing to head_dim / 2; default
            `split_rotary_pairs(head_dim)`.
    """

    def __init__(
        self,
        head_dim: int,
        grid: tuple[int, int],
        theta_t: float = 10_000.0,
        theta_hw: float = 100.0,
        pairs: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        pairs = split_rotary_pairs(head_dim) if pairs is None else tuple(pairs)
        if len(pairs) != 3 or sum(pairs) != head_dim // 2 or head_dim % 2 != 0:
            raise ValueError(f"pairs {pairs} must be three counts summing to head_dim / 2 = {head_dim / 2}")
        self.head_dim = head_dim
        self.grid = (int(grid[0]), int(grid[1]))
        self.theta_t = float(theta_t)
        self.theta_hw = float(theta_hw)
        self.pairs = pairs
        self._spatial_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._table_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # oldest first

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    def _spatial(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the (height, width) pairs: each (N, ph + pw)."""
        key = (device, dtype)
        if key not in self._spatial_cache:
            self._spatial_cache[key] = self._spatial_tables(device, dtype)
        return self._spatial_cache[key]

    @torch.inference_mode(False)  # a cached table made during a dream's inference-mode call must serve training too
    def _spatial_tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        H, W = self.grid
        _, ph, pw = self.pairs
        dev = _float64_device(device)
        rows = torch.arange(H, dtype=torch.float64, device=dev).repeat_interleave(W)  # (N,)
        cols = torch.arange(W, dtype=torch.float64, device=dev).repeat(H)  # (N,)
        angles = torch.cat(
            [rows[:, None] * _inv_freq(ph, self.theta_hw, dev), cols[:, None] * _inv_freq(pw, self.theta_hw, dev)],
            dim=-1,
        )  # (N, ph + pw)
        return angles.cos().to(device, dtype), angles.sin().to(device, dtype)

    def cos_sin(
        self, start_frame: int, n_frames: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (n_frames * N, head_dim / 2), for frames start_frame .. + n_frames - 1.

        Rows follow the token order of `x.reshape(B, T * N, ...)`: frame-major, then row-major grid.
        dtype: float32 (default, also right for bf16 models: `apply_rotary` rotates in float32) or
        float64 for float64 reference runs. The returned tensors are shared with later calls for
        the same frames: do not modify them in place.
        """
        cos, sin = self.cos_sin_rows([start_frame], n_frames, device, dtype)
        return cos[0], sin[0]

    def cos_sin_rows(
        self, start_frames: Sequence[int], n_frames: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`cos_sin` for B streams that continue at different frames (a batch whose streams were
        restarted at different times), built in one go: each (B, n_frames * N, head_dim / 2)."""
        device = torch.device(device)
        key = (tuple(int(s) for s in start_frames), int(n_frames), device, dtype)
        if key not in self._table_cache:
            if len(self._table_cache) >= _TABLE_CACHE_SIZE:
                del self._table_cache[next(iter(self._table_cache))]
            self._table_cache[key] = self._tables(*key)
        return self._table_cache[key]

    @torch.inference_mode(False)  # cached too (cos_sin_rows): must serve training after a dream
    def _tables(
        self, start_frames: tuple[int, ...], n_frames: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, N = len(start_frames), self.tokens_per_frame
        pt, ph, pw = self.pairs
        dev = _float64_device(device)
        starts = torch.tensor(start_frames, dtype=torch.float64, device=dev)  # (B,)
        t = starts[:, None] + torch.arange(n_frames, dtype=torch.float64, device=dev)  # (B, T), exact integers
        angles_t = t[..., None] * _inv_freq(pt, self.theta_t, dev)  # (B, T, pt), float64: see module doc
        cos_t = angles_t.cos().to(device, dtype)
        sin_t = angles_t.sin().to(device, dtype)
        cos_s, sin_s = self._spatial(device, dtype)

        def table(time_part: torch.Tensor, space_part: torch.Tensor) -> torch.Tensor:
            # Time pairs first, then height and width pairs, for every (stream, frame, token).
            return torch.cat(
                [time_part[:, :, None, :].expand(B, n_frames, N, pt), space_part.expand(B, n_frames, N, ph + pw)],
                dim=-1,
            ).reshape(B, n_frames * N, pt + ph + pw)  # (B, T * N, head_dim / 2)

        return table(cos_t, cos_s), table(sin_t, sin_s)


_TABLE_CACHE_SIZE = 8
"""Tables a `VideoRoPE` keeps (the latest first-frame(s) asked for: a streamed frame asks for its
table once per denoiser call and once more to commit)."""


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., L, head_dim) by the angles whose cos/sin are (L, head_dim / 2).

    Works in float32 at least (bf16 rotations drift; float64 stays float64), returns x's dtype.
    """
    half = x.shape[-1] // 2
    xf = x if x.dtype == torch.float64 else x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)
