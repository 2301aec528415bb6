"""Block-wise Mamba2 layer for video tokens (LSSVWM, Po et al. 2025, arXiv 2505.20171).

Tokens arrive frame by frame, each frame an H x W grid in raster order. The grid is cut into
(b_h, b_w) blocks and every block is its own Mamba2 sequence across time: its b_h*b_w tokens of
frame 0 (raster order inside the block), then its tokens of frame 1, and so on, with its own SSM
and conv state. Temporally adjacent tokens are then b_h*b_w apart instead of H*W, which is what
lets a small state remember a long past. block = (H, W) is plain Mamba2 over all tokens of all
frames; block = (1, 1) scans every pixel on its own.

Three entry points, as in Mamba2:
    forward(x, cache=None)  parallel over T frames (training; also prefill when given a cache)
    step(x_frame, cache)    one new frame, constant cost whatever the horizon (streaming)
    allocate_cache(...)     per-block SSM states + conv states; size fixed, independent of T
`begin_step(cache)` prepares what several `step` calls on the same new frame share (the sampler's
denoiser calls read the cache several times before one call commits the frame).

    layer = BlockwiseMamba2(128, grid=(8, 8), block=(2, 2))
    cache = layer.allocate_cache(batch=4)
    layer(context, cache)            # (4, T, 64, 128): prefill leaves the cache ready
    y = layer.step(next_frame, cache)  # (4, 64, 128) -> (4, 64, 128)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from worldsim.model.ssd import default_chunk_size, ssd_chunked, ssd_one_chunk
from worldsim.model.streams import stream_indices


# ---------------------------------------------------------------------------------------------
# Token layout
# ---------------------------------------------------------------------------------------------


def check_blocks(grid: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """(blocks along H, blocks along W); ValueError unless `block` tiles `grid` exactly."""
    (h, w), (bh, bw) = grid, block
    if min(h, w, bh, bw) < 1:
        raise ValueError(f"grid {grid} and block {block} must be positive")
    if h % bh or w % bw:
        raise ValueError(f"block size {block} does not divide the token grid {grid}; pick divisors of H={h} and W={w}")
    return h // bh, w // bw


def tokens_to_blocks(x: torch.Tensor, grid: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """(batch, T, H*W, D) frame-major raster tokens -> (batch * n_blocks, T * b_h*b_w, D).

    Row i of the result is block i % n_blocks of batch item i // n_blocks (blocks in raster order
    over the block grid); along the sequence come its tokens of frame 0, then of frame 1, ...
    """
    batch, frames, _, dim = x.shape
    (bh, bw), (nbh, nbw) = block, check_blocks(grid, block)
    x = x.reshape(batch, frames, nbh, bh, nbw, bw, dim)  # (b, T, nbh, bh, nbw, bw, D)
    x = x.permute(0, 2, 4, 1, 3, 5, 6)  # (b, nbh, nbw, T, bh, bw, D)
    return x.reshape(batch * nbh * nbw, frames * bh * bw, dim)  # (b * nb, T * bh*bw, D)


def blocks_to_tokens(x: torch.Tensor, batch: int, grid: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Inverse of `tokens_to_blocks`: (batch * n_blocks, T * b_h*b_w, D) -> (batch, T, H*W, D)."""
    (bh, bw), (nbh, nbw) = block, check_blocks(grid, block)
    frames = x.shape[1] // (bh * bw)
    x = x.reshape(batch, nbh, nbw, frames, bh, bw, x.shape[-1])  # (b, nbh, nbw, T, bh, bw, D)
    x = x.permute(0, 3, 1, 4, 2, 5, 6)  # (b, T, nbh, bh, nbw, bw, D)
    return x.reshape(batch, frames, grid[0] * grid[1], x.shape[-1])  # (b, T, H*W, D)


# ---------------------------------------------------------------------------------------------
# Inference cache
# ---------------------------------------------------------------------------------------------


@dataclass
class BlockwiseSSMCache:
    """Streaming state of one BlockwiseMamba2 layer for `batch` independent streams.

    Rows are (stream, block) pairs, stream-major: row r is block r % n_blocks of stream
    r // n_blocks. The layer replaces the tensors (not their contents) when it advances, so a
    `clone()` or `select()` taken earlier never changes.
    """

    ssm_state: torch.Tensor
    """(batch * n_blocks, heads, head_dim, d_state): SSM state of every block."""
    conv_state: torch.Tensor
    """(batch * n_blocks, conv_channels, d_conv - 1): last conv inputs of every block's sequence."""
    n_blocks: int
    """Blocks per frame, to split rows into streams."""

    @property
    def batch_size(self) -> int:
        return self.ssm_state.shape[0] // self.n_blocks

    def clone(self) -> BlockwiseSSMCache:
        """An independent copy (forking a rollout)."""
        return BlockwiseSSMCache(self.ssm_state.clone(), self.conv_state.clone(), self.n_blocks)

    def select(self, indices: Sequence[int] | torch.Tensor) -> BlockwiseSSMCache:
        """A new cache holding streams `indices` (1-D ints, repeats allowed, or a bool mask).

        `cache.select([0] * 8)` forks stream 0 into 8 copies; `cache.select(best)` keeps the
        streams a planner picked. The result owns its memory.
        """
        idx = stream_indices(indices, self.batch_size).to(self.ssm_state.device)

        def pick(t: torch.Tensor) -> torch.Tensor:
            per_stream = t.reshape(self.batch_size, self.n_blocks, *t.shape[1:])  # (batch, nb, ...)
            return per_stream[idx].reshape(-1, *t.shape[1:])  # (k * nb, ...)

        return BlockwiseSSMCache(pick(self.ssm_state), pick(self.conv_state), self.n_blocks)

    def assign(self, indices: Sequence[int] | torch.Tensor, other: BlockwiseSSMCache) -> None:
        """Overwrite streams `indices` (distinct, one per stream of `other`) with `other`'s streams.

        E.g. `other` freshly prefilled from a new context restarts those streams. Like stepping, it
        replaces this cache's tensors rather than writing into them, so earlier copies stay as they were.
        """
        if other.n_blocks != self.n_blocks or (other.ssm_state.shape[1:], other.conv_state.shape[1:]) != (
            self.ssm_state.shape[1:], self.conv_state.shape[1:]
        ):
            raise ValueError(
                f"cannot assign a cache of {other.n_blocks} blocks, ssm_state {tuple(other.ssm_state.shape)} and "
                f"conv_state {tuple(other.conv_state.shape)} to one of {self.n_blocks} blocks, "
                f"{tuple(self.ssm_state.shape)} and {tuple(self.conv_state.shape)}"
            )
        idx = stream_indices(indices, self.batch_size, incoming=other.batch_size)

        def put(t: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            out = t.reshape(self.batch_size, self.n_blocks, *t.shape[1:]).clone()  # (batch, nb, ...)
            out[idx.to(t.device)] = new.reshape(-1, self.n_blocks, *t.shape[1:]).to(t.device, t.dtype)
            return out.reshape(t.shape)

        self.ssm_state = put(self.ssm_state, other.ssm_state)
        self.conv_state = put(self.conv_state, other.conv_state)

    def to(self, *args, **kwargs) -> BlockwiseSSMCache:
        """Same arguments as `torch.Tensor.to`; returns a new cache."""
        return BlockwiseSSMCache(self.ssm_state.to(*args, **kwargs), self.conv_state.to(*args, **kwargs), self.n_blocks)

    def nbytes(self) -> int:
        return self.ssm_state.nbytes + self.conv_state.nbytes


@dataclass
class SSMStepFrame:
    """What the `step` calls on one new frame share, from `BlockwiseMamba2.begin_step(cache)`.
    Valid until the cache advances (the committing step ends it)."""

    cache: BlockwiseSSMCache
    history: torch.Tensor
    """(rows, d_conv - 1, conv_dim) the cache's last conv inputs, time-major like the new tokens."""
    conv_taps: tuple[torch.Tensor, ...]
    """d_conv tensors (conv_dim,): the depthwise kernel's weights of each tap."""
    A: torch.Tensor
    """(heads,) the decay rates -exp(A_log), at least float32."""


def cache_nbytes(cache: BlockwiseSSMCache | Iterable[BlockwiseSSMCache]) -> int:
    """Bytes held by one layer's cache, or the sum over an iterable of them (a whole model)."""
    if isinstance(cache, BlockwiseSSMCache):
        return cache.nbytes()
    return sum(c.nbytes() for c in cache)


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight, normalised over groups of `group_size` channels (Mamba2's
    output norm with norm_before_gate=False; one group per B/C group)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        gated = (y * F.silu(z)).to(torch.promote_types(dtype, torch.float32))  # no half-precision RMS
        if gated.shape[-1] == self.group_size:  # one group (Mamba2's default): no regrouping views
            return F.rms_norm(gated, (self.group_size,), eps=self.eps).to(dtype) * self.weight
        grouped = gated.unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        grouped = F.rms_norm(grouped, (self.group_size,), eps=self.eps)  # x / sqrt(mean(x^2) + eps)
        return grouped.flatten(-2).to(dtype) * self.weight  # (..., dim)


class BlockwiseMamba2(nn.Module):
    """Mamba2 mixer scanned per spatial block across frames.

    in_proj -> (z, x, B, C, dt); depthwise causal conv1d + SiLU over (x, B, C) along each block's
    sequence; SSD scan with per-head scalar A = -exp(A_log) and dt = softplus(dt + dt_bias);
    D skip; gated RMSNorm with z; out_proj. Initialisation follows Mamba2.

    Args:
        d_model: token width.
        grid: (H, W) tokens per frame.
        block: (b_h, b_w) block size; must divide the grid. (H, W) = no block-wise scan.
        d_state: SSM state size per head (N).
        head_dim: channels per head (P); expand * d_model must be a multiple of it.
        expand: inner width = expand * d_model.
        d_conv: causal conv kernel length along the block sequence.
        n_groups: B/C groups shared by contiguous runs of heads (1 = shared by all heads).
        chunk_size: SSD chunk length for the parallel scan; None picks one for the device
            (`worldsim.model.ssd.default_chunk_size`: 32 on CPU, 256 on CUDA).
        dt_min, dt_max, dt_init_floor: range of the initial step sizes (log-uniform).
        A_init_range: range of the initial -A (uniform).
        backend: SSD backend, see `worldsim.model.ssd.ssd_chunked`.

    Parameters that should not be weight-decayed (A_log, D, dt_bias) carry
    `_no_weight_decay = True`, the Mamba convention.
    """

    def __init__(
        self,
        d_model: int,
        grid: tuple[int, int],
        block: tuple[int, int],
        d_state: int = 16,
        head_dim: int = 32,
        expand: int = 2,
        d_conv: int = 4,
        n_groups: int = 1,
        chunk_size: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        backend: str = "auto",
    ):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.block = (int(block[0]), int(block[1]))
        self.blocks_hw = check_blocks(self.grid, self.block)
        self.n_blocks = self.blocks_hw[0] * self.blocks_hw[1]
        self.block_len = self.block[0] * self.block[1]  # tokens per block per frame
        self.d_model, self.d_state, self.head_dim = d_model, d_state, head_dim
        self.d_inner = expand * d_model
        if self.d_inner % head_dim:
            raise ValueError(f"expand * d_model = {self.d_inner} is not a multiple of head_dim = {head_dim}")
        self.n_heads = self.d_inner // head_dim
        if self.n_heads % n_groups:
            raise ValueError(f"heads ({self.n_heads}) must be a multiple of n_groups ({n_groups})")
        if d_conv < 1:
            raise ValueError(f"d_conv must be >= 1, got {d_conv}")
        self.n_groups, self.d_conv, self.chunk_size, self.backend = n_groups, d_conv, chunk_size, backend
        self.conv_dim = self.d_inner + 2 * n_groups * d_state  # channels of (x, B, C)

        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.n_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=True)

        # dt_bias = softplus^-1(dt0) with dt0 log-uniform in [dt_min, dt_max], so the initial
        # step sizes span fast and slow memories across heads.
        dt0 = torch.exp(torch.rand(self.n_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt0 = dt0.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt0 + torch.log(-torch.expm1(-dt0)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.n_heads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

        self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_inner // n_groups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, grid={self.grid}, block={self.block}, heads={self.n_heads}x{self.head_dim}, "
            f"d_state={self.d_state}, d_conv={self.d_conv}, chunk_size={self.chunk_size}"
        )

    # -- cache ---------------------------------------------------------------------------------

    def allocate_cache(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> BlockwiseSSMCache:
        """Zero state for `batch` streams (the same as starting `forward` with no cache).

        `dtype` defaults to the parameters' dtype. The SSM state is kept in at least float32 so a
        bf16 model does not accumulate rounding over thousands of frames; the conv state uses
        `dtype`.
        """
        device = self.A_log.device if device is None else device
        dtype = self.A_log.dtype if dtype is None else dtype
        rows = batch * self.n_blocks
        ssm = torch.zeros(rows, self.n_heads, self.head_dim, self.d_state, device=device,
                          dtype=torch.promote_types(dtype, torch.float32))
        conv = torch.zeros(rows, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype)
        return BlockwiseSSMCache(ssm, conv, self.n_blocks)

    def _check_cache(self, cache: BlockwiseSSMCache, rows: int) -> None:
        expected_ssm = (rows, self.n_heads, self.head_dim, self.d_state)
        expected_conv = (rows, self.conv_dim, self.d_conv - 1)
        fits = cache.ssm_state.shape == expected_ssm and cache.conv_state.shape == expected_conv
        if cache.n_blocks != self.n_blocks or not fits:
            raise ValueError(
                f"cache does not fit this layer and input: need {rows // self.n_blocks} streams x "
                f"{self.n_blocks} blocks with ssm_state {expected_ssm} and conv_state {expected_conv}, got "
                f"{cache.batch_size} streams x {cache.n_blocks} blocks, {tuple(cache.ssm_state.shape)} and "
                f"{tuple(cache.conv_state.shape)}"
            )

    # -- entry points --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, cache: BlockwiseSSMCache | None = None) -> torch.Tensor:
        """(batch, T, H*W, d_model) -> same shape, all T frames in parallel.

        With a cache, the scan starts from it and the cache is advanced past these T frames, so
        a prefill over context frames leaves it ready for `step`. The new cache tensors keep the
        autograd graph when gradients are on: stream under `torch.no_grad()` for inference.
        """
        if x.dim() != 4 or x.shape[2] != self.grid[0] * self.grid[1] or x.shape[3] != self.d_model:
            raise ValueError(
                f"expected (batch, T, H*W={self.grid[0] * self.grid[1]}, d_model={self.d_model}) tokens, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] == 0:
            raise ValueError("need at least one frame (T >= 1)")
        u = tokens_to_blocks(x, self.grid, self.block)  # (b * nb, T * bh*bw, D)
        y = self._mix(u, cache)  # (b * nb, T * bh*bw, D)
        return blocks_to_tokens(y, x.shape[0], self.grid, self.block)  # (b, T, H*W, D)

    def decay_rates(self) -> torch.Tensor:
        """(heads,) A = -exp(A_log): negative, so every decay exp(dt A) is in (0, 1); at least
        float32 (kernels want it)."""
        return -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    def step_sizes(self, dt_raw: torch.Tensor) -> torch.Tensor:
        """dt = softplus(dt_raw + dt_bias) (..., heads) from in_proj's dt outputs (its last `n_heads`)."""
        return F.softplus(dt_raw + self.dt_bias)

    def begin_step(self, cache: BlockwiseSSMCache) -> SSMStepFrame:
        """What every `step` on the next frame of `cache` shares (pass it as `frame=`)."""
        if cache is None:
            raise ValueError("step needs a cache; create one with allocate_cache(batch)")
        self._check_cache(cache, cache.ssm_state.shape[0])
        return SSMStepFrame(
            cache=cache,
            history=cache.conv_state.transpose(1, 2),  # (rows, d_conv - 1, conv_dim)
            # contiguous rows: a strided (stride d_conv) operand makes the multiply-adds ~3x slower
            conv_taps=self.conv1d.weight[:, 0].t().contiguous().unbind(0),  # d_conv x (conv_dim,)
            A=self.decay_rates(),
        )

    def step(self, x_frame: torch.Tensor, cache: BlockwiseSSMCache, commit: bool = True,
             frame: SSMStepFrame | None = None) -> torch.Tensor:
        """One new frame (batch, H*W, d_model) -> (batch, H*W, d_model); advances `cache`
        (commit=False: reads it and leaves it as it was, e.g. for a denoising step).
        `frame`: `begin_step(cache)`, shared by the calls on one frame (made here when None).

        The same function as `forward` on a one-frame sequence from the cached state, written for
        it: each block's b_h*b_w tokens go through the conv as a few multiply-adds after the
        cached inputs and through the scan as one chunk (`ssd_one_chunk`), and the new state is
        only computed when committed. So streaming T frames equals `forward` over all T up to
        float rounding (tests check both against each other).
        """
        if x_frame.dim() != 3:
            raise ValueError(f"step takes one frame (batch, H*W, d_model), got shape {tuple(x_frame.shape)}")
        frame = self.begin_step(cache) if frame is None else frame
        if x_frame.shape[1:] != (self.grid[0] * self.grid[1], self.d_model) or (
            x_frame.shape[0] * self.n_blocks != frame.history.shape[0]
        ):
            raise ValueError(
                f"cache does not fit this layer and input: need (batch={frame.cache.batch_size}, "
                f"H*W={self.grid[0] * self.grid[1]}, d_model={self.d_model}) tokens, got {tuple(x_frame.shape)}"
            )
        one_block = self.n_blocks == 1  # block = the grid: the frame's tokens are already the block's
        u = x_frame if one_block else tokens_to_blocks(x_frame[:, None], self.grid, self.block)  # (rows, L, D)
        rows, length, _ = u.shape
        z, xbc, dt = F.linear(u, self.in_proj.weight).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)

        # Depthwise causal conv along time, as multiply-adds over [cached inputs, new tokens]:
        # output l = bias + sum_k w_k * input (l + k) of the padded sequence.
        padded = torch.cat([frame.history.to(xbc.dtype), xbc], dim=1)  # (rows, d_conv - 1 + L, conv_dim)
        taps = frame.conv_taps
        conv = torch.addcmul(self.conv1d.bias, padded.narrow(1, 0, length), taps[0])
        for k in range(1, self.d_conv):
            conv = conv.addcmul_(padded.narrow(1, k, length), taps[k])
        x, B, C = F.silu(conv).split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)

        x = x.reshape(rows, length, self.n_heads, self.head_dim)  # (N, L, h, p)
        B = B.reshape(rows, length, self.n_groups, self.d_state)  # (N, L, g, n)
        C = C.reshape(rows, length, self.n_groups, self.d_state)  # (N, L, g, n)
        dt = self.step_sizes(dt)  # (N, L, h)
        cache = frame.cache
        y, final = ssd_one_chunk(x, dt, frame.A, B, C, cache.ssm_state, final_state=commit)  # (N, L, h, p)
        if commit:
            # New tensors, not writes into the old ones: earlier clones and selections stay as they were.
            cache.ssm_state = final.to(cache.ssm_state.dtype)
            cache.conv_state = padded[:, length:].transpose(1, 2).to(cache.conv_state.dtype)  # (N, conv_dim, K - 1)
        y = torch.addcmul(y, x, self.D[:, None].to(x.dtype))  # (N, L, h, p): the D skip
        y = self.norm(y.reshape(rows, length, self.d_inner), z)  # (N, L, d_inner)
        y = F.linear(y, self.out_proj.weight)  # (N, L, d_model)
        if one_block:
            return y  # (batch, H*W, d_model)
        return blocks_to_tokens(y, x_frame.shape[0], self.grid, self.block)[:, 0]  # (batch, H*W, d_model)

    # -- the Mamba2 mixer over block sequences -------------------------------------------------

    def _causal_conv(self, xbc: torch.Tensor, cache: BlockwiseSSMCache | None) -> torch.Tensor:
        """Depthwise causal conv + SiLU along each sequence: (N, L, conv_dim) -> same."""
        xbc = xbc.transpose(1, 2)  # (N, conv_dim, L)
        if cache is None:
            history = xbc.new_zeros(xbc.shape[0], self.conv_dim, self.d_conv - 1)
        else:
            history = cache.conv_state.to(xbc.dtype)
        padded = torch.cat([history, xbc], dim=-1)  # (N, conv_dim, d_conv - 1 + L)
        if cache is not None:
            cache.conv_state = padded[..., padded.shape[-1] - (self.d_conv - 1):].to(cache.conv_state.dtype)
        return F.silu(self.conv1d(padded)).transpose(1, 2)  # (N, L, conv_dim)

    def _mix(self, u: torch.Tensor, cache: BlockwiseSSMCache | None) -> torch.Tensor:
        rows, length, _ = u.shape
        if cache is not None:
            self._check_cache(cache, rows)
        z, xbc, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xbc = self._causal_conv(xbc, cache)  # (N, L, conv_dim)
        x, B, C = xbc.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        x = x.reshape(rows, length, self.n_heads, self.head_dim)  # (N, L, h, p)
        B = B.reshape(rows, length, self.n_groups, self.d_state)  # (N, L, g, n)
        C = C.reshape(rows, length, self.n_groups, self.d_state)  # (N, L, g, n)
        dt = self.step_sizes(dt)  # (N, L, h)
        y, final = ssd_chunked(
            x, dt, self.decay_rates(), B, C, self.chunk_size or default_chunk_size(x),
            initial_state=None if cache is None else cache.ssm_state,
            backend=self.backend,
        )  # (N, L, h, p), (N, h, p, n)
        if cache is not None:
            cache.ssm_state = final.to(cache.ssm_state.dtype)
        y = y + x * self.D[:, None].to(x.dtype)  # (N, L, h, p)
        y = self.norm(y.reshape(rows, length, self.d_inner), z)  # (N, L, d_inner)
        return self.out_proj(y)  # (N, L, d_model)
