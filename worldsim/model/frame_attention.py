"""Frame-local attention (LSSVWM, Po et al. 2025, arXiv 2505.20171), with a KV cache for streaming.

Tokens come frame by frame, N = tokens_per_frame per frame. The rule, for a window of k frames:

    a query token of frame t attends to every token of frames max(0, t - k) .. t

i.e. its own frame bidirectionally plus the k previous frames, never a later frame. The model makes
one frame per action, so this is causal in time and a streamed frame sees exactly what it saw in
training. k = 0 is per-frame attention; k = None is unbounded (causal full attention, the
"causal transformer" baseline; its KV cache grows with the horizon, which is what that baseline is
for). The paper groups frames in chunks of 5 that attend bidirectionally to themselves and to the
previous chunk (a 10-frame span, so a frame reaches 5 to 9 frames back and also sees later frames
of its chunk). A simulator that emits one frame per action cannot show a frame its successors, so
here every frame gets the same fixed reach instead: k = 9 spans the paper's 10 frames. Because the
rule depends only on frame offsets, streaming one frame at a time reproduces training exactly.

Attention functions take q (B, heads, Tq * N, d) and k, v (B, heads, Tk * N, d) with Tk >= Tq: the
queries are the LAST Tq frames of the keys (the first Tk - Tq key frames come from a KV cache).
Three exact implementations of the same rule:

- `flex_frame_attention`: FlexAttention with a block-sparse mask (built directly from the frame
  structure, no L x L evaluation). Fused when compiled. On CPU (torch 2.13) it has no backward.
- `chunked_frame_attention`: dense SDPA on chunks of c frames, each chunk's queries against the keys
  of [k previous frames, own chunk] with a small banded mask. Linear in T, differentiable anywhere:
  the CPU training path.
- `dense_frame_attention`: one SDPA with the explicit (Tq N x Tk N) boolean mask. The reference
  for tests; fine for short clips.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from worldsim.model.rope import VideoRoPE, apply_rotary
from worldsim.model.streams import stream_indices

log = logging.getLogger(__name__)

Backend = Literal["auto", "flex", "chunked", "dense"]
BACKENDS = ("auto", "flex", "chunked", "dense")


def lookback(window: int | None, n_key_frames: int) -> int:
    """Frames a query looks back, clipped to what exists: min(window, Tk - 1); None -> Tk - 1.

    Clipping changes nothing (there are no frames before key frame 0) but keeps the chunked path
    from padding thousands of empty frames when window >> T.
    """
    if window is None:
        return max(n_key_frames - 1, 0)
    return min(window, max(n_key_frames - 1, 0))


def frame_window_mask(
    n_query_frames: int, n_key_frames: int, window: int | None, device: torch.device | str | None = None
) -> torch.Tensor:
    """(Tq, Tk) bool: query frame i (absolute Tk - Tq + i) may see key frame j. The rule, per frame."""
    offset = n_key_frames - n_query_frames
    q_frame = torch.arange(n_query_frames, device=device)[:, None] + offset  # (Tq, 1)
    k_frame = torch.arange(n_key_frames, device=device)[None, :]  # (1, Tk)
    allowed = k_frame <= q_frame
    if window is not None:
        allowed &= q_frame - k_frame <= window
    return allowed


def _split_frames(q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int) -> tuple[int, int]:
    """(Tq, Tk) from token counts, with a clear error when they do not fit the frame layout."""
    N = tokens_per_frame
    Lq, Lk = q.shape[-2], k.shape[-2]
    if Lq == 0 or Lq % N or Lk % N:
        raise ValueError(f"sequence lengths {Lq} (queries) and {Lk} (keys) must be multiples of tokens_per_frame={N}")
    if Lk < Lq:
        raise ValueError(f"queries ({Lq} tokens) must be the last frames of the keys ({Lk} tokens)")
    return Lq // N, Lk // N


# ---------------------------------------------------------------------------------------------
# Dense reference
# ---------------------------------------------------------------------------------------------


def dense_frame_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens_per_frame: int, window: int | None
) -> torch.Tensor:
    """The rule as one SDPA with an explicit (Tq N, Tk N) mask: quadratic memory, obviously right."""
    N = tokens_per_frame
    Tq, Tk = _split_frames(q, k, N)
    frames = frame_window_mask(Tq, Tk, window, q.device)  # (Tq, Tk)
    mask = frames.repeat_interleave(N, dim=0).repeat_interleave(N, dim=1)  # (Tq N, Tk N)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------------------------------------
# Chunked exact path (linear in T, has a backward on every device)
# ---------------------------------------------------------------------------------------------


def _band_mask(chunk: int, back: int, tokens_per_frame: int, device: torch.device) -> torch.Tensor:
    """(c N, (back + c) N) bool for one query chunk of c frames against its key block.

    The key block of a chunk starting at frame a is frames a - back .. a + c - 1, so query frame
    a + s sees block frame r iff a + s - back <= a - back + r <= a + s, i.e. s <= r <= s + back.
    The same mask serves every chunk. Small masks come from a cache: never modify one in place.
    """
    if chunk * (back + chunk) * tokens_per_frame**2 <= _BAND_CACHE_MAX:
        return _cached_band_mask(chunk, back, tokens_per_frame, device)
    return _make_band_mask(chunk, back, tokens_per_frame, device)


# Masks of sliding windows are a few MB and reused by every layer and step; an unbounded window's
# grows with T and is rebuilt instead of pinned in the cache.
_BAND_CACHE_MAX = 1 << 22


def _make_band_mask(chunk: int, back: int, tokens_per_frame: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a cached mask made during a dream must serve training too
        s = torch.arange(chunk, device=device)[:, None]  # (c, 1)
        r = torch.arange(back + chunk, device=device)[None, :]  # (1, back + c)
        frames = (r >= s) & (r <= s + back)  # (c, back + c)
        return frames.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


_cached_band_mask = functools.lru_cache(maxsize=16)(_make_band_mask)


def chunked_frame_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tokens_per_frame: int,
    window: int | None,
    chunk_frames: int | None = None,
) -> torch.Tensor:
    """The rule with dense SDPA on chunks of c query frames: exact, linear in T, differentiable.

    Chunk m's queries (frames a .. a + c - 1) see the key block a - k .. a + c - 1: the k frames
    before the chunk plus the chunk itself (the previous ceil(k / c) chunks and its own), with the
    banded `_band_mask` inside, the same mask for every chunk. With c = 1 the mask is all-True and
    dropped. The chunks whose block would start before key frame 0 (at most ceil(k / c) of them)
    run one SDPA call each on the keys that exist, with the mask's leading columns cut, so nothing
    ever attends to padding. All other chunks are gathered with `unfold` (one copy of the keys,
    (k + c) / c times their size) into one batched SDPA call.

    chunk_frames: c; default `default_chunk_frames(k, N)`. Any c >= 1 gives the same result.
    """
    N = tokens_per_frame
    Tq, Tk = _split_frames(q, k, N)
    P = Tk - Tq  # cached frames before the first query frame
    back = lookback(window, Tk)
    c = default_chunk_frames(back, N) if chunk_frames is None else chunk_frames
    c = max(1, min(c, Tq))
    band = None if c == 1 else _band_mask(c, back, N, q.device)  # (c N, (back + c) N)
    n = math.ceil(Tq / c)
    n_head = min(n, max(0, math.ceil((back - P) / c)))  # chunks m with P + m c - back < 0

    outputs = []
    for m in range(n_head):
        a = P + m * c  # the chunk's first frame, in key coordinates
        cm = min(c, Tq - m * c)  # its frame count (the last chunk may be short)
        cut = back - a  # block frames that would lie before key frame 0
        mask = None if band is None else band[: cm * N, cut * N : (back + cm) * N]
        outputs.append(
            F.scaled_dot_product_attention(
                q[:, :, m * c * N : (m * c + cm) * N],  # (B, H, cm N, D)
                k[:, :, : (a + cm) * N],  # (B, H, (a + cm) N, D)
                v[:, :, : (a + cm) * N],
                attn_mask=mask,
            )
        )

    if n_head < n:
        B, H, _, D = q.shape
        n_rest = n - n_head
        pad = n * c - Tq  # query frames added at the end so the last chunk is whole
        q_rest = F.pad(q[:, :, n_head * c * N :], (0, 0, 0, pad * N))  # (B, H, n_rest c N, D)
        q_rest = q_rest.reshape(B, H * n_rest, c * N, D)  # (B, H n_rest, c N, D)
        first = P + n_head * c - back  # first frame of the first batched block, >= 0

        def blocks(x: torch.Tensor) -> torch.Tensor:
            # Padded key frames at the end are later than every real query's frame, so the band
            # mask already hides them (c = 1 has no padding); padded queries are dropped below.
            x = x[:, :, first * N :].reshape(B, H, -1, N, D)  # (B, H, Tk - first, N, D)
            x = F.pad(x, (0, 0, 0, 0, 0, pad))  # (B, H, n_rest c + back, N, D)
            x = x.unfold(2, back + c, c)  # (B, H, n_rest, N, D, back + c): strided view, no copy yet
            x = x.permute(0, 1, 2, 5, 3, 4)  # (B, H, n_rest, back + c, N, D)
            return x.reshape(B, H * n_rest, (back + c) * N, D)  # (B, H n_rest, (back + c) N, D)

        rest = F.scaled_dot_product_attention(q_rest, blocks(k), blocks(v), attn_mask=band)  # (B, H n_rest, c N, D)
        rest = rest.reshape(B, H, n_rest * c * N, D)  # (B, H, n_rest c N, D)
        outputs.append(rest[:, :, : (Tq - n_head * c) * N])
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]  # (B, H, Tq N, D)


def default_chunk_frames(back: int, tokens_per_frame: int) -> int:
    """Chunk size for `chunked_frame_attention`: ceil(k / 2) frames, at most ~1024 query tokens.

    A chunk of c frames computes scores against k + c key frames of which each query uses k + 1,
    so small c wastes less; but tiny chunks make small SDPA tiles and copy the keys (k + c) / c
    times. Measured (2 CPU cores, fwd+bwd, N = 16..256 tokens/frame, k = 4..32), c between k/4
    and k/2 was fastest, c = k up to 2x slower, c = 1 up to 3x slower. For k = 10 this is the
    paper's 5-frame chunk. The token cap bounds the band mask (c N x (k + c) N) for long windows
    and k = None, where most chunks then run as their own call against all earlier frames.
    """
    return max(1, min(math.ceil(back / 2), 1024 // tokens_per_frame))


# ---------------------------------------------------------------------------------------------
# FlexAttention path
# ---------------------------------------------------------------------------------------------

FLEX_BLOCK = 128  # FlexAttention's default sparse block size (tokens)


@functools.lru_cache(maxsize=32)
def frame_block_mask(
    n_query_frames: int,
    n_key_frames: int,
    tokens_per_frame: int,
    window: int | None,
    device: torch.device,
) -> BlockMask:
    """BlockMask of the rule for Tq query frames that are the last of Tk key frames; cached per shape.

    `create_block_mask` would evaluate the mask_mod on all (Tq N) x (Tk N) pairs (6-13 s at
    L = 16384 on 2 CPU cores). The rule is a band in frame space, so which 128 x 128 tiles are
    empty, partial or full follows from each tile's frame ranges: O((L / 128)^2) work. The mask_mod
    is still applied inside partial tiles. Tiles that stick out past the sequence end count as
    partial, as in `create_block_mask`.
    """
    N = tokens_per_frame
    offset = n_key_frames - n_query_frames
    back = lookback(window, n_key_frames)
    Lq, Lk = n_query_frames * N, n_key_frames * N

    def mask_mod(b, h, q_idx, kv_idx):
        q_frame = q_idx // N + offset
        kv_frame = kv_idx // N
        return (kv_frame <= q_frame) & (q_frame - kv_frame <= back)

    def tile_frames(length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        starts = torch.arange(0, length, FLEX_BLOCK, device=device)  # (n_tiles,)
        ends = torch.clamp(starts + FLEX_BLOCK, max=length)  # exclusive token end
        return starts // N, (ends - 1) // N, starts + FLEX_BLOCK <= length  # first, last frame, whole

    q_first, q_last, q_whole = tile_frames(Lq)
    k_first, k_last, k_whole = tile_frames(Lk)
    q_first, q_last, q_whole = q_first[:, None] + offset, q_last[:, None] + offset, q_whole[:, None]  # (nq, 1)
    # Some pair allowed: the key frame interval meets [q_first - back, q_last].
    any_allowed = (k_first[None] <= q_last) & (k_last[None] >= q_first - back)  # (nq, nk)
    # Every pair allowed: latest key <= earliest query and earliest key >= latest query - back.
    all_allowed = (k_last[None] <= q_first) & (k_first[None] >= q_last - back) & q_whole & k_whole[None]
    partial = any_allowed & ~all_allowed

    def ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # FlexAttention's sparse format: per query tile, the count and (first) the indices of kv tiles.
        tiles = tiles[None, None].to(torch.int32)  # (1, 1, nq, nk)
        counts = tiles.sum(-1, dtype=torch.int32)  # (1, 1, nq)
        indices = torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32)  # (1, 1, nq, nk)
        return counts, indices

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(all_allowed)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(Lq, Lk)
    )


@functools.cache
def _compiled_flex():
    # One compiled callable for the process: torch.compile caches kernels per shape behind it.
    return torch.compile(flex_attention)


def flex_frame_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tokens_per_frame: int,
    window: int | None,
    compiled: bool = True,
) -> torch.Tensor:
    """The rule with FlexAttention and `frame_block_mask`.

    compiled=False runs FlexAttention's unfused eager implementation (materialises the scores, and
    warns once): only for tests on small sizes. On CPU (torch 2.13) neither has a backward.
    """
    Tq, Tk = _split_frames(q, k, tokens_per_frame)
    block_mask = frame_block_mask(Tq, Tk, tokens_per_frame, window, q.device)
    attend = _compiled_flex() if compiled else flex_attention
    return attend(q, k, v, block_mask=block_mask)


def resolve_backend(backend: Backend, device: torch.device, needs_grad: bool) -> str:
    """The implementation "auto" picks, and a clear error for a backend that cannot run here.

    auto:
    - CUDA: flex, forward and backward (fused Triton kernels, block-sparse: the fast path).
    - CPU with gradients: chunked, since FlexAttention has no CPU backward in torch 2.13.
    - CPU without gradients (inference, prefill): chunked as well. Measured on 2 cores at
      T=256, N=64, d_model=128, 4 heads, k=10: chunked 80 ms vs compiled flex 105 ms, and flex
      costs a 15-20 s torch.compile on first use plus ~13 s more when the shape first changes.
      `backend="flex"` is still there for CPU inference when asked for.
    - anything else (MPS, ...): chunked (plain SDPA runs everywhere).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "flex" if device.type == "cuda" else "chunked"
    if backend == "flex" and needs_grad and device.type != "cuda":
        raise ValueError(
            f"backend='flex' has no backward on {device.type} (torch {torch.__version__}); "
            "use backend='chunked' (exact, differentiable) or 'auto', or run under torch.no_grad()"
        )
    return backend


def frame_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tokens_per_frame: int,
    window: int | None,
    backend: Backend = "auto",
    flex_compiled: bool = True,
) -> torch.Tensor:
    """Dispatch q (B, heads, Tq N, d), k, v (B, heads, Tk N, d) -> (B, heads, Tq N, d) to a backend."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    name = resolve_backend(backend, q.device, needs_grad)
    if not torch.compiler.is_compiling():  # logging breaks a compiled graph; the eager calls log it
        _log_once(f"frame attention: backend={name} (asked {backend}) on {q.device.type}, grad={needs_grad}")
    if name == "flex":
        return flex_frame_attention(q, k, v, tokens_per_frame, window, compiled=flex_compiled)
    if name == "chunked":
        return chunked_frame_attention(q, k, v, tokens_per_frame, window)
    return dense_frame_attention(q, k, v, tokens_per_frame, window)


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------


@dataclass
class FrameKVCache:
    """Post-RoPE keys and values of the frames a new frame may still attend to, for B streams.

    Slots: finite window k: a ring of k frame slots, fixed size from allocation on; every write
    goes to slot `frames_seen % k` for all rows at once (rows advance in lockstep). window=None:
    one slot per frame written, in order; it grows by one slot per step.

    Rows are independent streams: each has its own absolute frame index (`next_frames`, the RoPE
    position of its next frame) and its own count of held frames (`valid`): a row holds its
    `valid[b]` most recently written slots, the rest are masked out of its attention. Rows that
    only ever streamed together hold every written slot and take the mask-free path; a row
    overwritten by `assign` with a shorter context holds fewer. (RoPE makes scores depend on frame
    offsets only, but a row's own positions are kept so its keys match a stream started alone.)

    Updated in place by `FrameLocalAttention.step` / `forward`; `clone()` before forking a rollout.
    Meant for inference: it keeps whatever autograd history the written keys carry.
    """

    keys: torch.Tensor  # (B, heads, slots, N, head_dim)
    values: torch.Tensor  # (B, heads, slots, N, head_dim)
    window: int | None
    next_frames: torch.Tensor  # (B,) int64 on the CPU: absolute index of each row's next frame
    valid: torch.Tensor  # (B,) int64 on the CPU: frames each row holds (its most recent slots)
    frames_seen: int = 0  # frames written since allocation, batch-wide (the ring cursor; = slots for None)

    @property
    def next_frame(self) -> int:
        """Absolute frame index of the next frame, when all rows agree (else see `next_frames`)."""
        first = int(self.next_frames[0]) if len(self.next_frames) else 0
        if not bool((self.next_frames == first).all()):
            raise ValueError(f"rows continue at different frames {self.next_frames.tolist()}; use next_frames")
        return first

    @property
    def slots(self) -> int:
        return self.keys.shape[2]

    @property
    def n_filled(self) -> int:
        """Slots written since allocation (<= window): what a row that never restarted holds."""
        return self.slots if self.window is None else min(self.frames_seen, self.window)

    @property
    def rows_aligned(self) -> bool:
        """Every row holds every filled slot: attention over the cache needs no mask."""
        return bool((self.valid == self.n_filled).all())

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def _ages(self) -> torch.Tensor:
        """(slots,) int64 (CPU): how many writes ago each slot was written (0 = the latest)."""
        S = self.slots
        age = self.frames_seen - 1 - torch.arange(S)
        return age if self.window is None else age % max(S, 1)

    def past(self, in_order: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Cached keys, values (B, heads, P N, head_dim) and held (B, P) bool or None (all held).

        Aligned rows: the P = n_filled filled slots, mask-free. Otherwise all slots with the
        per-row mask of the ones each row holds. in_order: oldest frame first (needed when the
        frame-window rule is applied by position); else ring order (fine for a one-frame step,
        where every held frame is inside the window).
        """
        B, H, S, N, D = self.keys.shape
        aligned = self.rows_aligned
        P = self.n_filled if aligned else S
        ages = self._ages()
        order = None
        # Slots 0 .. n_filled - 1 are already oldest first for window=None and for a ring that has
        # not wrapped; a wrapped ring, or all slots of a masked one, start at the cursor.
        from_cursor = not aligned or self.frames_seen > S
        if in_order and self.window is not None and P > 0 and from_cursor:
            order = torch.argsort(ages, descending=True, stable=True)  # (S,) slot (frames_seen + i) % S
            ages = ages[order]
            order = order.to(self.keys.device)
        keys, values = (self.keys, self.values) if order is None else (
            self.keys.index_select(2, order), self.values.index_select(2, order))
        keys = keys[:, :, :P].reshape(B, H, P * N, D)  # (B, H, P N, D)
        values = values[:, :, :P].reshape(B, H, P * N, D)
        held = None if aligned else (ages[None, :] < self.valid[:, None]).to(self.keys.device)  # (B, S)
        return keys, values, held

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Record T new frames of every row, keys/values (B, heads, T, N, head_dim), in place."""
        if keys.shape[:2] != self.keys.shape[:2] or keys.shape[3:] != self.keys.shape[3:]:
            raise ValueError(f"new keys {tuple(keys.shape)} do not fit cache {tuple(self.keys.shape)}")
        T = keys.shape[2]
        if self.window is None:
            self.keys = torch.cat([self.keys, keys.to(self.keys.dtype)], dim=2)  # (B, H, seen + T, N, D)
            self.values = torch.cat([self.values, values.to(self.values.dtype)], dim=2)
            self.valid = self.valid + T
        else:
            S = self.window
            keep = min(T, S)  # older new frames would be overwritten anyway (S = 0: keep nothing)
            if keep > 0:
                slot = (self.frames_seen + T - keep) % S
                first = min(keep, S - slot)  # slots up to the ring's end, then wrap to slot 0
                src = T - keep
                self.keys[:, :, slot : slot + first] = keys[:, :, src : src + first]
                self.values[:, :, slot : slot + first] = values[:, :, src : src + first]
                self.keys[:, :, : keep - first] = keys[:, :, src + first : T]
                self.values[:, :, : keep - first] = values[:, :, src + first : T]
            self.valid = torch.clamp(self.valid + T, max=S)
        self.next_frames = self.next_frames + T
        self.frames_seen += T

    def clone(self) -> FrameKVCache:
        return replace(self, keys=self.keys.clone(), values=self.values.clone(),
                       next_frames=self.next_frames.clone(), valid=self.valid.clone())

    def select(self, indices: torch.Tensor | list[int]) -> FrameKVCache:
        """A new cache with the batch rows `indices` (copied), e.g. to keep the best plans. The
        indices are not checked here: its one caller, `WorldModelCache.select`, checked them."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.keys.device)
        out = replace(self, keys=self.keys.index_select(0, idx), values=self.values.index_select(0, idx),
                      next_frames=self.next_frames[idx.cpu()], valid=self.valid[idx.cpu()])
        out._drop_unheld_slots()
        return out

    def assign(self, indices: torch.Tensor | list[int], other: FrameKVCache) -> None:
        """Overwrite rows `indices` (distinct) with the rows of `other` (same window and layout), in place.

        E.g. `other` freshly prefilled from a new context: those rows restart as if streamed alone
        (their frame counters and held frames come from `other`, whatever its length). Finite
        window: `other`'s ring is rotated so each frame keeps its age; memory is unchanged.
        window=None: rows of different lengths share the slots, each masking what it does not
        hold; the slots grow if `other` holds more frames than this cache has slots, and the
        leading slots no row holds any more are dropped.
        """
        if other.window != self.window or other.keys.shape[1:2] + other.keys.shape[3:] != (
            self.keys.shape[1:2] + self.keys.shape[3:]
        ):
            raise ValueError(
                f"cannot assign a cache (window={other.window}, shape {tuple(other.keys.shape)}) to one "
                f"(window={self.window}, shape {tuple(self.keys.shape)}): heads, N, head_dim and window must match"
            )
        idx = stream_indices(indices, self.batch_size, incoming=other.batch_size)
        rows = idx.to(self.keys.device)
        new_k = other.keys.to(self.keys.device, self.keys.dtype)
        new_v = other.values.to(self.values.device, self.values.dtype)
        if self.window is not None:
            if self.window > 0:
                # Slot of the frame written `a` writes ago: (frames_seen - 1 - a) % window in each
                # ring, so rotating by the cursor difference keeps every frame's age.
                shift = (self.frames_seen - other.frames_seen) % self.window
                new_k, new_v = torch.roll(new_k, shift, dims=2), torch.roll(new_v, shift, dims=2)
            self.keys[rows], self.values[rows] = new_k, new_v
        else:
            need = int(other.valid.max()) if len(other.valid) else 0
            if need > self.slots:  # grow on the oldest side: no other row holds those slots
                pad = need - self.slots
                self.keys = F.pad(self.keys, (0, 0, 0, 0, pad, 0))
                self.values = F.pad(self.values, (0, 0, 0, 0, pad, 0))
                self.frames_seen = self.slots
            m = min(self.slots, other.slots)  # the newest m slots of both line up by age
            S = self.slots
            self.keys[rows], self.values[rows] = 0, 0  # slots the new rows do not hold: masked anyway
            self.keys[rows, :, S - m :] = new_k[:, :, other.slots - m :]
            self.values[rows, :, S - m :] = new_v[:, :, other.slots - m :]
        # Out of place: `to()` copies may share these small counter tensors.
        self.next_frames, self.valid = self.next_frames.clone(), self.valid.clone()
        self.next_frames[idx] = other.next_frames
        self.valid[idx] = other.valid
        self._drop_unheld_slots()

    def _drop_unheld_slots(self) -> None:
        """window=None: forget the oldest slots that no row holds, so memory follows the longest row."""
        if self.window is None and self.batch_size and int(self.valid.max()) < self.slots:
            keep = int(self.valid.max())
            first = self.slots - keep
            self.keys = self.keys[:, :, first:].contiguous()
            self.values = self.values[:, :, first:].contiguous()
            self.frames_seen = keep

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FrameKVCache:
        return replace(
            self, keys=self.keys.to(device=device, dtype=dtype), values=self.values.to(device=device, dtype=dtype)
        )


@dataclass
class AttentionStepFrame:
    """What the `step` calls on one new frame share, from `FrameLocalAttention.begin_step(cache)`.
    Valid until the cache advances (the committing step ends it)."""

    cache: FrameKVCache
    keys: torch.Tensor
    """(B, heads, (P + 1) N, head_dim): the P held frames' keys, then room for the new frame's.
    Copied from the cache once per frame; each call writes its new keys into the last N rows, so
    the calls do not concatenate the past again (order does not matter to a one-frame query)."""
    values: torch.Tensor
    """Same layout for the values."""
    mask: torch.Tensor | None
    """(B, 1, 1, (P + 1) N) bool, the keys each row holds; None when every row holds them all."""
    cos: torch.Tensor
    """(1 or B, N, 2, 1, head_dim) the new frame's RoPE cos, repeated for both halves of a head,
    times the q (index 0) and k (1) RMSNorm weights: the norms' scale and the rotation in one
    multiply ((1 or B, N, 1, 1, head_dim) without qk_norm). Broadcasts over (B, N, q/k, heads, D)."""
    sin: torch.Tensor
    """Same for sin, negated on the first half, times the weights with their halves swapped."""


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


class FrameLocalAttention(nn.Module):
    """Multi-head frame-local attention with 3-axis RoPE: (B, T, N, d_model) -> (B, T, N, d_model).

    Args:
        d_model: channels.
        n_heads: heads; head_dim = d_model / n_heads (even, >= 6 for the (t, h, w) RoPE split).
        tokens_per_frame: N, must equal H * W of `grid`.
        grid: (H, W) token grid of a frame, tokens in row-major order.
        window: k previous frames each frame sees (see the module doc); None = causal full attention.
        backend: "auto" | "flex" | "chunked" | "dense" (see `resolve_backend`). All are exact and
            give the same result up to float rounding.
        qk_norm: RMSNorm on queries and keys per head (keeps logits bounded in long bf16 runs).
        bias: biases on the qkv and output projections.
        rope_theta_t, rope_theta_hw: RoPE bases (see `VideoRoPE`).
        flex_compiled: run FlexAttention through torch.compile (False: eager, slow; for tests).

    Entry points (mamba-style): `forward` for clips (training; with a cache: prefill), `step` for one
    new frame, `allocate_cache` for the streaming state.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        tokens_per_frame: int,
        grid: tuple[int, int],
        window: int | None,
        backend: Backend = "auto",
        qk_norm: bool = True,
        bias: bool = False,
        rope_theta_t: float = 10_000.0,
        rope_theta_hw: float = 100.0,
        flex_compiled: bool = True,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if grid[0] * grid[1] != tokens_per_frame:
            raise ValueError(
                f"grid {tuple(grid)} has {grid[0] * grid[1]} tokens, tokens_per_frame is {tokens_per_frame}"
            )
        if window is not None and window < 0:
            raise ValueError(f"window must be >= 0 or None, got {window}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.tokens_per_frame = tokens_per_frame
        self.window = window
        self.backend = backend
        self.flex_compiled = flex_compiled
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.qk_norm = qk_norm
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.out = nn.Linear(d_model, d_model, bias=bias)
        self.rope = VideoRoPE(self.head_dim, grid, theta_t=rope_theta_t, theta_hw=rope_theta_hw)

    def extra_repr(self) -> str:
        return (
            f"heads={self.n_heads}, tokens_per_frame={self.tokens_per_frame}, "
            f"window={self.window}, backend={self.backend}"
        )

    def _qkv(
        self, x: torch.Tensor, start_frame: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, N, C) -> q, k, v (B, heads, T N, head_dim), normed and rotated at frames start_frame..

        start_frame: one int for all rows, or (B,) int64 (CPU), one start per row (a cache's rows).
        """
        B, T, N, C = x.shape
        qkv = self.qkv(x.reshape(B, T * N, C))  # (B, T N, 3 C)
        qkv = qkv.view(B, T * N, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T N, D)
        q, k, v = qkv.unbind(0)
        table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        starts = [start_frame] if isinstance(start_frame, int) else start_frame.tolist()
        if len(set(starts)) <= 1:  # the usual case: one table for the batch
            cos, sin = self.rope.cos_sin(starts[0] if starts else 0, T, x.device, table_dtype)  # (T N, D / 2)
        else:  # rows at different frames: one table per row
            cos, sin = self.rope.cos_sin_rows(starts, T, x.device, table_dtype)  # (B, T N, D / 2)
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T N, D / 2): broadcast over the heads
        q = apply_rotary(self.q_norm(q), cos, sin)
        k = apply_rotary(self.k_norm(k), cos, sin)
        return q, k, v

    def _merge_heads(self, y: torch.Tensor, T: int) -> torch.Tensor:
        """(B, heads, T N, head_dim) -> output projection (B, T, N, d_model)."""
        B = y.shape[0]
        y = y.transpose(1, 2).reshape(B, T, self.tokens_per_frame, self.d_model)  # (B, T, N, C)
        return self.out(y)

    def _check_input(self, x: torch.Tensor, ndim: int) -> None:
        if x.ndim != ndim or x.shape[-2:] != (self.tokens_per_frame, self.d_model):
            want = "(batch, T, N, d_model)" if ndim == 4 else "(batch, N, d_model)"
            raise ValueError(
                f"expected {want} with N={self.tokens_per_frame}, d_model={self.d_model}; got {tuple(x.shape)}"
            )

    def _check_cache(self, cache: FrameKVCache, x: torch.Tensor) -> None:
        want = (x.shape[0], self.n_heads, self.tokens_per_frame, self.head_dim)
        have = (cache.keys.shape[0], cache.keys.shape[1], cache.keys.shape[3], cache.keys.shape[4])
        if cache.window != self.window or have != want:
            raise ValueError(
                f"cache (window={cache.window}, batch/heads/N/head_dim={have}) does not match this layer "
                f"(window={self.window}, {want})"
            )
        if cache.keys.device != x.device:
            raise ValueError(f"cache is on {cache.keys.device}, input on {x.device}")

    def forward(
        self, x: torch.Tensor, cache: FrameKVCache | None = None, start_frame: int | None = None
    ) -> torch.Tensor:
        """x (B, T, N, d_model) -> (B, T, N, d_model).

        Without a cache: a clip whose first frame has absolute index `start_frame` (default 0; only
        RoPE positions depend on it). With a cache: the T frames continue each row's cached stream
        (they also attend to its cached frames; start_frame, if given, must equal every row's
        next frame) and are recorded in the cache afterwards: prefill a context clip, then `step`.
        """
        self._check_input(x, 4)
        B, T = x.shape[:2]
        if cache is None:
            q, k, v = self._qkv(x, 0 if start_frame is None else start_frame)
            y = frame_attention(q, k, v, self.tokens_per_frame, self.window, self.backend, self.flex_compiled)
            return self._merge_heads(y, T)

        self._check_cache(cache, x)
        if start_frame is not None and bool((cache.next_frames != start_frame).any()):
            at = cache.next_frames.tolist()
            at = at[0] if len(set(at)) == 1 else at
            raise ValueError(f"start_frame={start_frame} but the cache continues at frame {at}")
        q, k, v = self._qkv(x, cache.next_frames)
        past_k, past_v, held = cache.past(in_order=True)  # (B, H, P N, D), (B, P) or None
        keys = torch.cat([past_k.to(k.dtype), k], dim=2)  # (B, H, (P + T) N, D)
        values = torch.cat([past_v.to(v.dtype), v], dim=2)
        if held is None:  # every row holds every cached frame: the backends' shared mask
            y = frame_attention(q, keys, values, self.tokens_per_frame, self.window, self.backend, self.flex_compiled)
        else:  # rows hold different frames: the rule plus each row's held frames, one dense SDPA
            N, P = self.tokens_per_frame, held.shape[1]
            rule = frame_window_mask(T, P + T, self.window, x.device)  # (T, P + T)
            seen = torch.cat([held, held.new_ones(B, T)], dim=1)  # (B, P + T)
            mask = (rule[None] & seen[:, None]).repeat_interleave(N, 1).repeat_interleave(N, 2)  # (B, T N, (P + T) N)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])  # (B, H, T N, D)
        N, D = self.tokens_per_frame, self.head_dim
        cache.append(
            k.view(B, self.n_heads, T, N, D),  # (B, H, T, N, D)
            v.view(B, self.n_heads, T, N, D),
        )
        return self._merge_heads(y, T)

    def begin_step(self, cache: FrameKVCache) -> AttentionStepFrame:
        """What every `step` on the next frame of `cache` shares (pass it as `frame=`): the held
        keys and values, their mask and the frame's RoPE table, built once."""
        have = (cache.keys.shape[1], cache.keys.shape[3], cache.keys.shape[4])
        if cache.window != self.window or have != (self.n_heads, self.tokens_per_frame, self.head_dim):
            raise ValueError(
                f"cache (window={cache.window}, heads/N/head_dim={have}) does not match this layer "
                f"(window={self.window}, {(self.n_heads, self.tokens_per_frame, self.head_dim)})"
            )
        B, H, N, D = cache.batch_size, self.n_heads, self.tokens_per_frame, self.head_dim
        past_k, past_v, held = cache.past(in_order=False)  # (B, H, P N, D); key order does not matter here
        PN = past_k.shape[2]
        dtype = self.qkv.weight.dtype
        keys = past_k.new_empty(B, H, PN + N, D, dtype=dtype)
        values = past_v.new_empty(B, H, PN + N, D, dtype=dtype)
        keys[:, :, :PN], values[:, :, :PN] = past_k, past_v
        mask = None
        if held is not None:
            seen = torch.cat([held, held.new_ones(B, 1)], dim=1)  # (B, P + 1): the new frame is always seen
            mask = seen.repeat_interleave(N, dim=1)[:, None, None]  # (B, 1, 1, (P + 1) N)

        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        starts = cache.next_frames.tolist()
        if len(set(starts)) == 1:  # the usual case: one table for the batch
            cos, sin = self.rope.cos_sin(starts[0], 1, keys.device, table_dtype)  # (N, D / 2)
            cos, sin = cos[None], sin[None]  # (1, N, D / 2)
        else:  # rows at different frames: one table per row
            cos, sin = self.rope.cos_sin_rows(starts, 1, keys.device, table_dtype)  # (B, N, D / 2)
        # RoPE in its rotate-half form: rotate(x) = x * [cos, cos] + swap_halves(x) * [-sin, sin].
        cos = torch.cat([cos, cos], dim=-1)[:, :, None, None]  # (1 or B, N, 1, 1, D)
        sin = torch.cat([-sin, sin], dim=-1)[:, :, None, None]
        if self.qk_norm:  # rotate(x * w) = x * (w cos) + swap_halves(x) * (swap_halves(w) sin)
            weight = torch.stack([self.q_norm.weight, self.k_norm.weight])[:, None].to(cos.dtype)  # (2, 1, D)
            cos, sin = cos * weight, sin * weight.roll(D // 2, dims=-1)  # (1 or B, N, 2, 1, D)
        return AttentionStepFrame(cache=cache, keys=keys, values=values, mask=mask, cos=cos, sin=sin)

    def step(self, x: torch.Tensor, cache: FrameKVCache, commit: bool = True,
             frame: AttentionStepFrame | None = None) -> torch.Tensor:
        """One new frame x (B, N, d_model) -> (B, N, d_model); attends to the cache and itself.
        `frame`: `begin_step(cache)`, shared by the calls on one frame (made here when None).

        Every held frame is inside the window, so this is one SDPA over (held + 1) frames, with
        no mask unless some row holds fewer frames than others (a restarted row); the cache is then
        updated in place, unless commit=False (a denoising step: the frame is not recorded).
        The same function as `forward` on a one-frame clip, written for it: q and k are normed and
        rotated together, by RoPE in its rotate-half form (x cos + swap_halves(x) sin').
        """
        self._check_input(x, 3)
        frame = self.begin_step(cache) if frame is None else frame
        B, N, C = x.shape
        H, D = self.n_heads, self.head_dim
        if B != frame.keys.shape[0]:
            raise ValueError(f"input batch {B} does not match the cache's {frame.keys.shape[0]} rows")
        if frame.keys.device != x.device:
            raise ValueError(f"cache is on {frame.keys.device}, input on {x.device}")
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias).view(B, N, 3, H, D)
        qk = qkv[:, :, :2]  # (B, N, 2, H, D)
        if self.qk_norm:  # the norms' weights are in the RoPE tables
            qk = F.rms_norm(qk, (D,), eps=self.q_norm.eps)
        # RoPE in at least float32 (as `apply_rotary`), both halves in one multiply-add.
        rot = qk.to(frame.cos.dtype)
        rot = torch.addcmul(rot * frame.cos, rot.roll(D // 2, dims=-1), frame.sin).to(qkv.dtype)  # (B, N, 2, H, D)
        q = rot[:, :, 0].transpose(1, 2)  # (B, H, N, D)
        PN = frame.keys.shape[2] - N
        new_k, new_v = frame.keys[:, :, PN:], frame.values[:, :, PN:]  # (B, H, N, D) views into the buffers
        new_k.copy_(rot[:, :, 1].transpose(1, 2))
        new_v.copy_(qkv[:, :, 2].transpose(1, 2))
        y = F.scaled_dot_product_attention(q.to(frame.keys.dtype), frame.keys, frame.values,
                                           attn_mask=frame.mask)  # (B, H, N, D)
        if commit:
            frame.cache.append(new_k.view(B, H, 1, N, D), new_v.view(B, H, 1, N, D))
        y = y.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return F.linear(y, self.out.weight, self.out.bias)

    def allocate_cache(
        self,
        batch: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        start_frame: int = 0,
    ) -> FrameKVCache:
        """An empty cache; the first frame written gets absolute index `start_frame`.

        Defaults: the device and dtype of this layer's weights. For a finite window the whole ring
        (window frames) is allocated now, so memory stays constant over the rollout.
        """
        weight = self.qkv.weight
        device = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if dtype is None else dtype
        slots = 0 if self.window is None else self.window
        shape = (batch, self.n_heads, slots, self.tokens_per_frame, self.head_dim)
        return FrameKVCache(
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
            window=self.window,
            next_frames=torch.full((batch,), start_frame, dtype=torch.long),
            valid=torch.zeros(batch, dtype=torch.long),
        )
