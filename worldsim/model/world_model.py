"""The LSSVWM world model (Po et al. 2025, arXiv 2505.20171): a hybrid SSM / local-attention stack
denoising one latent frame per action, with reward and termination heads.

Reading order: primitives (patching, MLP) -> `HybridBlock` built by `create_block(cfg, layer_idx)`
-> the streaming cache -> output layers -> `WorldModelNet` (the raw network F) -> `WorldModel`
(F inside EDM preconditioning, the public entry points).

One block, on tokens x (B, T, N, d) with a per-frame conditioning vector c (B, T, d):

    x = x + g1 * BlockwiseSSM(modulate(norm(x), c))     [variants with an SSM]
    x = x + g2 * FrameLocalAttention(modulate(norm(x), c))   [variants with attention]
    x = x + g3 * MLP(modulate(norm(x), c))

with (shift, scale, gate) per branch from adaLN-Zero (see `conditioning`). Everything except the
SSM and the attention acts on one frame at a time, and those two have exact streaming forms, so
the whole model streams: `step` on frame t from a cache == `forward` over frames 0..t.

The direct path (`cfg.prev_frames` = K > 0). Diffusion forcing gives every frame of a training
window its own noise level, so through the backbone a frame mostly sees a *noisy* past, while at
inference the past is always clean: only the first frame after a clean prefix trains the case the
simulator runs (about 5% of the loss frames with 16-frame windows). A model trained that way
learns to lean on its noisy context and predicts little better than copying the last frame.
With K > 0 each frame's tokens also receive the clean latents of the K frames before it through
their own linear layer (`prev_in`): in training they come from the data, at inference from the
last K committed frames, which the cache keeps (`WorldModelCache.recent`). So every loss frame
trains exactly the inference case, at the cost of one small linear layer. DIAMOND conditions its
denoiser on stacked clean past frames for the same reason; the backbone still carries the long
context. Frames before the start of a window or a stream are zeros.

The local head (`cfg.local_head` = H > 0). The backbone sees a frame as tokens of p x p latent
cells and emits each token's values from one d_model vector; the next frame of a maze differs from
the last one mostly by small shifts and scalings of the view. A three-layer conv net at latent
resolution, fed the backbone's output, the frame's noisy input and the direct path's previous
frames (conditioned on noise level and action), adds that local, full-resolution detail, as the
U-Net of DIAMOND does, for a few percent of a call's work. Its last conv is zero-initialised, so a
model warm-started without it computes exactly what it did.

Streaming protocol (the dream env's loop): per new frame, the sampler calls
`step(x, sigma, action, cache, commit=False)` at each noise level (the cache is left as it was),
then `step(clean_frame, 0, action, cache)` commits the clean frame to the cache and returns the
reward and termination of the transition that led to it. commit=False returns what committing
to `cache.clone()` would, without copying the cache (the layers read it and write nothing).

Those calls on one frame share a lot: the action, the cached past, its attention keys, the
direct path's frames. `begin_frame(cache, action)` does that work once and returns a `FrameStep`
whose `denoise(x, sigma)` is the sampler's denoiser and whose `commit(x)` ends the frame; `step`
is a FrameStep used once. On a CPU a streamed frame of a small model is bound by per-op overhead,
not arithmetic, so the one-frame path (`HybridBlock.step`, the layers' `step`) is written with
few, fused ops; it computes what `forward` computes, up to float rounding (tests hold them equal).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from worldsim.diffusion.edm import EDMConfig, EDMPrecond
from worldsim.model.blockwise_ssm import BlockwiseMamba2, BlockwiseSSMCache, SSMStepFrame
from worldsim.model.conditioning import ActionEmbedding, AdaLNZero, NoiseLevelEmbedding, modulate
from worldsim.model.config import ModelConfig
from worldsim.model.frame_attention import AttentionStepFrame, FrameKVCache, FrameLocalAttention
from worldsim.model.streams import stream_indices

# ---------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Latents (B, T, C, h, w) -> tokens (B, T, N, C p p), N = (h / p)(w / p) in raster order."""
    B, T, C, h, w = x.shape
    x = x.reshape(B, T, C, h // patch, patch, w // patch, patch)  # (B, T, C, gh, p, gw, p)
    x = x.permute(0, 1, 3, 5, 2, 4, 6)  # (B, T, gh, gw, C, p, p)
    return x.reshape(B, T, (h // patch) * (w // patch), C * patch * patch)  # (B, T, N, C p p)


def unpatchify(x: torch.Tensor, channels: int, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, T, N, C p p) -> (B, T, C, h, w)."""
    B, T = x.shape[:2]
    gh, gw = grid
    x = x.reshape(B, T, gh, gw, channels, patch, patch)  # (B, T, gh, gw, C, p, p)
    x = x.permute(0, 1, 4, 2, 5, 3, 6)  # (B, T, C, gh, p, gw, p)
    return x.reshape(B, T, channels, gh * patch, gw * patch)  # (B, T, C, h, w)


class Mlp(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# ---------------------------------------------------------------------------------------------
# The block
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerCache:
    """Streaming state of one block: its SSM's per-block states and its attention's KV cache."""

    ssm: BlockwiseSSMCache | None
    kv: FrameKVCache | None


@dataclass
class LayerStepFrame:
    """What the step calls of one new frame share in one block (the layers' `begin_step`)."""

    ssm: SSMStepFrame | None
    attn: AttentionStepFrame | None


class HybridBlock(nn.Module):
    """[SSM] + [frame-local attention] + MLP, each an adaLN-Zero residual branch (module doc).

    forward(x (B, T, N, d), c (B, T, d), cache) runs T frames in parallel (the cache advances);
    step(x (B, N, d), silu(c) (B, d), frame, commit) runs one new frame through the layers' `step`.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d = cfg.d_model
        self.ssm = None
        if cfg.has_ssm:
            self.ssm = BlockwiseMamba2(
                d, cfg.token_grid, cfg.ssm_blocks[layer_idx], d_state=cfg.d_state, head_dim=cfg.ssm_head_dim,
                expand=cfg.ssm_expand, d_conv=cfg.d_conv, chunk_size=cfg.ssm_chunk_size, backend=cfg.ssm_backend,
            )
        self.attn = None
        if cfg.has_attention:
            self.attn = FrameLocalAttention(
                d, cfg.n_heads, cfg.tokens_per_frame, cfg.token_grid, cfg.attn_window, backend=cfg.attn_backend
            )
        self.mlp = Mlp(d, int(cfg.mlp_ratio * d))
        # No affine parameters: the per-frame (shift, scale) replace them (DiT). One parameter-free
        # norm module serves all branches.
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.n_branches = 1 + (self.ssm is not None) + (self.attn is not None)
        self.modulation = AdaLNZero(d, d, 3 * self.n_branches)

    def forward(self, x: torch.Tensor, c: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        mods = self.modulation(c)  # 3 per branch, each (B, T, d)
        branches = []
        if self.ssm is not None:
            branches.append((self.ssm, None if cache is None else cache.ssm))
        if self.attn is not None:
            branches.append((self.attn, None if cache is None else cache.kv))
        branches.append((self.mlp, None))
        for i, (layer, layer_cache) in enumerate(branches):
            shift, scale, gate = mods[3 * i : 3 * i + 3]
            h = modulate(self.norm(x), shift, scale)
            h = layer(h) if layer is self.mlp else layer(h, layer_cache)
            x = x + gate.unsqueeze(-2) * h  # gate broadcast over the N tokens
        return x

    def begin_step(self, cache: LayerCache) -> LayerStepFrame:
        return LayerStepFrame(None if self.ssm is None else self.ssm.begin_step(cache.ssm),
                              None if self.attn is None else self.attn.begin_step(cache.kv))

    def step(self, x: torch.Tensor, c_act: torch.Tensor, frame: LayerStepFrame, commit: bool) -> torch.Tensor:
        """`forward` for one new frame: x (B, N, d), c_act = silu(c) (B, d) (shared by every block).

        Same math with fewer ops: one view of the modulation for all branches, modulate and the
        gated residual as one multiply-add each (x * (1 + scale) + shift, x + gate * h).
        """
        B, N, d = x.shape
        mods = F.linear(c_act, self.modulation.linear.weight, self.modulation.linear.bias)
        mods = mods.view(B, 3 * self.n_branches, 1, d)
        mods[:, 1::3] += 1  # 1 + scale
        mods = mods.unbind(1)  # (shift, 1 + scale, gate) per branch, each (B, 1, d)
        branches = []
        if self.ssm is not None:
            branches.append((self.ssm, frame.ssm))
        if self.attn is not None:
            branches.append((self.attn, frame.attn))
        for i, (layer, layer_frame) in enumerate(branches):
            shift, scale, gate = mods[3 * i : 3 * i + 3]
            h = torch.addcmul(shift, F.layer_norm(x, (d,), eps=self.norm.eps), scale)
            h = layer.step(h, layer_frame.cache, commit=commit, frame=layer_frame)
            x = torch.addcmul(x, gate, h)
        shift, scale, gate = mods[-3:]
        h = torch.addcmul(shift, F.layer_norm(x, (d,), eps=self.norm.eps), scale)
        h = F.linear(h, self.mlp.fc1.weight, self.mlp.fc1.bias)
        h = F.linear(F.gelu(h, approximate=step_gelu_approximation(h.dtype)), self.mlp.fc2.weight, self.mlp.fc2.bias)
        return torch.addcmul(x, gate, h)


def step_gelu_approximation(dtype: torch.dtype) -> str:
    """The GELU of the one-frame step: the tanh form the model trains with, except in bfloat16.
    There the exact (erf) form stands in: the two differ by at most 4.7e-4 (near x = 2.7, where
    bfloat16's values lie 1.6e-2 apart), which rounding to bfloat16 mostly erases, and on the CPU
    it runs 4-5x faster (1024 x 384 values on one thread: 0.3 ms against 1.3 ms; 18 calls a frame)."""
    return "none" if dtype == torch.bfloat16 else "tanh"


def create_block(cfg: ModelConfig, layer_idx: int) -> HybridBlock:
    """Layer `layer_idx` of the stack; its SSM block size is cfg.ssm_blocks[layer_idx]."""
    return HybridBlock(cfg, layer_idx)


# ---------------------------------------------------------------------------------------------
# Streaming cache
# ---------------------------------------------------------------------------------------------


@dataclass
class WorldModelCache:
    """Per-layer SSM states + KV caches of `batch` streams, and the frames they have seen.

    Advanced in place by `WorldModel.forward(..., cache=)` (prefill) and `WorldModel.step`.
    `clone()` forks (planning), `select(idx)` picks / repeats streams.
    Size is fixed from allocation on, except for causal_full whose KV cache grows per frame.
    """

    layers: list[LayerCache]
    frames_seen: int = 0
    recent: torch.Tensor | None = None
    """(B, K, C, h, w) the last K committed clean latents, oldest first (the direct path); None when K = 0."""

    @property
    def batch_size(self) -> int:
        first = self.layers[0]
        return first.ssm.batch_size if first.ssm is not None else first.kv.batch_size

    def clone(self) -> WorldModelCache:
        return WorldModelCache(
            [LayerCache(None if l.ssm is None else l.ssm.clone(), None if l.kv is None else l.kv.clone())
             for l in self.layers],
            self.frames_seen,
            None if self.recent is None else self.recent.clone(),
        )

    def select(self, indices: Sequence[int] | torch.Tensor) -> WorldModelCache:
        """Streams `indices` (1-D ints, repeats allowed, or a bool mask over the batch), copied."""
        idx = stream_indices(indices, self.batch_size)
        return WorldModelCache(
            [LayerCache(None if l.ssm is None else l.ssm.select(idx),
                        None if l.kv is None else l.kv.select(idx.to(l.kv.keys.device))) for l in self.layers],
            self.frames_seen,
            None if self.recent is None else self.recent[idx.to(self.recent.device)],
        )

    def assign(self, indices: Sequence[int] | torch.Tensor, other: WorldModelCache) -> None:
        """Overwrite streams `indices` (1-D distinct ints or a bool mask) with the streams of `other`,
        a cache of the same model (e.g. freshly prefilled from new context), in place.

        Each stream then continues exactly as `other`'s would alone, whatever the lengths of the
        two histories: the attention caches keep per-stream frame counters and masks (see
        `FrameKVCache.assign`). `frames_seen` stays the batch's count of frames written.
        """
        # Checked here, before any layer changes, so a bad call leaves the cache as it was.
        idx = stream_indices(indices, self.batch_size, incoming=other.batch_size)
        structure = [(l.ssm is None, l.kv is None) for l in self.layers] + [self.recent is None]
        if structure != [(l.ssm is None, l.kv is None) for l in other.layers] + [other.recent is None]:
            raise ValueError("cannot assign a cache of a different model (its layers do not match)")
        for mine, theirs in zip(self.layers, other.layers):
            if mine.ssm is not None:
                mine.ssm.assign(idx, theirs.ssm)
            if mine.kv is not None:
                mine.kv.assign(idx, theirs.kv)
        if self.recent is not None:
            self.recent[idx.to(self.recent.device)] = other.recent.to(self.recent)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> WorldModelCache:
        return WorldModelCache(
            [LayerCache(None if l.ssm is None else l.ssm.to(device=device, dtype=dtype),
                        None if l.kv is None else l.kv.to(device=device, dtype=dtype)) for l in self.layers],
            self.frames_seen,
            None if self.recent is None else self.recent.to(device=device, dtype=dtype),
        )

    def nbytes(self) -> int:
        total = 0
        for l in self.layers:
            total += 0 if l.ssm is None else l.ssm.nbytes()
            total += 0 if l.kv is None else l.kv.nbytes  # a property on FrameKVCache
        if self.recent is not None:
            total += self.recent.numel() * self.recent.element_size()
        return total


class FrameStep:
    """One new frame of every stream of a cache: the work its denoiser calls and its commit share,
    done once (module doc). From `WorldModel.begin_frame(cache, action)`; inference only.

        frame = model.begin_frame(cache, action)
        latent = sample_next_frames(frame.denoise, ...)   # D(x; sigma) per call, cache untouched
        out = frame.commit(latent)                         # advances the cache; the frame is done

    Shared: the action embedding; the direct path's projection of the cached clean frames, with
    patch_in's bias and the token positions folded in, and the local head's response to them;
    each attention layer's held keys and values (copied once into a buffer with room for the new
    frame's) and RoPE table; each SSM layer's conv history. It holds until the cache changes: after `commit`, or after the cache advances
    by other means, calls raise; other changes to the cache (`assign`) are not detected, so begin
    a new frame after them.
    """

    def __init__(self, model: WorldModel, cache: WorldModelCache, action: torch.Tensor,
                 no_action: torch.Tensor | None = None):
        net, cfg = model.net, model.cfg
        self.model, self.cache = model, cache
        self.frames_seen = cache.frames_seen
        B, N = cache.batch_size, cfg.tokens_per_frame
        dtype = net.patch_in.weight.dtype
        bias = net.patch_in.bias + net.pos  # (N, d)
        if net.prev_in is not None:
            prev = cache.recent.to(dtype).reshape(B, 1, -1, *cfg.latent_grid)  # (B, 1, K C, h, w)
            bias = bias + net.prev_in(patchify(prev, cfg.patch)[:, 0])  # (B, N, d)
        self.token_bias = bias.expand(B, N, cfg.d_model).reshape(B * N, cfg.d_model)
        """(B N, d) what every call adds to patch_in's matmul of the new frame's tokens."""
        self.action_emb = net.action_emb(action[:, None], None if no_action is None else no_action[:, None])[:, 0]
        """(B, d) the action's part of the conditioning vector."""
        self.layers = [block.begin_step(layer_cache) for block, layer_cache in zip(net.blocks, cache.layers)]
        self.local_prev_part = None
        """(B, 1, H, h, w) | (H, 1, 1) the local head's response to the direct path's frames (+ bias)."""
        if net.local_head is not None:
            prev = None if cache.recent is None else cache.recent[:, None]  # (B, 1, K, C, h, w)
            self.local_prev_part = net.local_head.prev_part(prev)

    def denoise(self, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x_noisy; sigma) (B, C, h, w) for x_noisy (B, C, h, w), sigma (B,): the sampler's
        denoiser. Reads the cache, writes nothing, skips the reward / termination heads."""
        # Inference mode skips autograd's per-op bookkeeping, a tenth of a small model's call; the
        # clone hands back an ordinary tensor (an inference tensor refuses later in-place use).
        with torch.inference_mode():
            denoised = self.run(x_noisy, sigma, commit=False, heads=False).denoised
        return denoised.clone()

    def commit(self, x_clean: torch.Tensor, sigma: torch.Tensor | None = None) -> WorldModelOutput:
        """Commit the new frame (sigma = 0 unless given): the cache advances by it, and the output
        carries the reward and termination of the transition into it. Ends this FrameStep."""
        if sigma is None:
            sigma = x_clean.new_zeros(x_clean.shape[0])
        return self.run(x_clean, sigma, commit=True)

    def run(self, x_noisy: torch.Tensor, sigma: torch.Tensor, commit: bool, heads: bool = True) -> WorldModelOutput:
        """`WorldModel.step` on this frame. heads=False leaves reward and termination_logit None."""
        cache = self.cache
        if cache.frames_seen != self.frames_seen:
            raise RuntimeError("this FrameStep's frame was committed (the cache has moved on); "
                               "begin the next frame with model.begin_frame(cache, action)")
        self.model._check_latents(x_noisy, sigma, (cache.batch_size,))
        heads_out: dict[str, torch.Tensor] | None = {} if heads else None
        denoised = self.model.precond(x_noisy[:, None], sigma[:, None],  # (B, 1, ...): a one-frame clip
                                      frame=self, commit=commit, heads_out=heads_out)[:, 0]
        if commit:
            cache.frames_seen += 1
            if cache.recent is not None:  # the committed frame is clean (sigma = 0): it joins the direct path
                cache.recent = torch.cat([cache.recent[:, 1:], x_noisy[:, None].to(cache.recent)], dim=1)
        if not heads:
            return WorldModelOutput(denoised, None, None)
        return WorldModelOutput(denoised, heads_out["reward"][:, 0], heads_out["termination_logit"][:, 0])


# ---------------------------------------------------------------------------------------------
# Output layers
# ---------------------------------------------------------------------------------------------


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + a zero-initialised linear to the token's latent values (DiT)."""

    def __init__(self, d_model: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.modulation = AdaLNZero(d_model, d_model, 2)
        self.linear = nn.Linear(d_model, out_channels)
        nn.init.zeros_(self.linear.weight)  # F = 0 at init: the denoiser starts as c_skip * x
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c)
        return self.linear(modulate(self.norm(x), shift, scale))

    def step(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        """`forward` for one frame: x (B, N, d), c_act = silu(c) (B, d) (see `HybridBlock.step`)."""
        B, N, d = x.shape
        mods = F.linear(c_act, self.modulation.linear.weight, self.modulation.linear.bias)
        shift, scale = mods.view(B, 2, 1, d).unbind(1)  # (B, 1, d) each
        h = torch.addcmul(shift, F.layer_norm(x, (d,), eps=self.norm.eps), scale + 1)
        return F.linear(h, self.linear.weight, self.linear.bias)


class LocalHead(nn.Module):
    """A residual conv net at latent resolution on top of the token output (module doc).

    In: the output F_tok (B, T, C, h, w), the network's input c_in x (B, T, C, h, w), the direct
    path's previous frames (B, T, K, C, h, w) or None, silu(c) (B, T, d). Out: F_tok + a 3-layer
    conv refinement; the first hidden layer is shifted and scaled from the conditioning vector.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, K, H = cfg.latent_channels, cfg.prev_frames, cfg.local_head
        self.own_channels = 2 * C  # F_tok and the input; the previous frames' K C follow
        self.conv_in = nn.Conv2d(self.own_channels + K * C, H, 3, padding=1)
        self.modulation = nn.Linear(cfg.d_model, 2 * H)
        nn.init.zeros_(self.modulation.weight)  # starts as an unmodulated conv
        nn.init.zeros_(self.modulation.bias)
        self.conv_mid = nn.Conv2d(H, H, 3, padding=1)
        self.conv_out = nn.Conv2d(H, C, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the head adds nothing at init (warm starts are exact)
        nn.init.zeros_(self.conv_out.bias)

    def prev_part(self, prev: torch.Tensor | None) -> torch.Tensor:
        """conv_in's response to the previous frames (..., K, C, h, w), plus its bias: (..., H, h, w).
        A frame's denoiser calls share it (`FrameStep`)."""
        w, b = self.conv_in.weight, self.conv_in.bias
        if prev is None:
            return b[:, None, None]  # (H, 1, 1)
        lead = prev.shape[:-4]
        stacked = prev.reshape(-1, prev.shape[-4] * prev.shape[-3], *prev.shape[-2:])  # (L, K C, h, w)
        out = F.conv2d(stacked.to(w.dtype), w[:, self.own_channels :], b, padding=1)  # (L, H, h, w)
        return out.view(*lead, *out.shape[1:])

    def forward(self, f_tok: torch.Tensor, x_in: torch.Tensor, prev_part: torch.Tensor,
                c_act: torch.Tensor) -> torch.Tensor:
        """prev_part: `prev_part(prev)` broadcastable to (B, T, H, h, w)."""
        B, T, C, h, w = f_tok.shape
        own = torch.cat([f_tok, x_in.to(f_tok.dtype)], dim=2).flatten(0, 1)  # (B T, 2 C, h, w)
        weight = self.conv_in.weight[:, : self.own_channels]
        hidden = F.conv2d(own, weight, padding=1).view(B, T, -1, h, w) + prev_part  # (B, T, H, h, w)
        shift, scale = self.modulation(c_act).chunk(2, dim=-1)  # (B, T, H) each
        hidden = F.silu(torch.addcmul(shift[..., None, None], hidden, 1 + scale[..., None, None]))
        hidden = F.silu(self.conv_mid(hidden.flatten(0, 1)))  # (B T, H, h, w)
        return f_tok + self.conv_out(hidden).view(B, T, C, h, w)


class RewardTerminationHead(nn.Module):
    """Per frame: mean over its tokens -> LayerNorm -> MLP -> (reward, termination logit)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.mlp(self.norm(x.mean(dim=-2)))  # (B, T, 2)
        return out[..., 0], out[..., 1]


# ---------------------------------------------------------------------------------------------
# The network F and the preconditioned model
# ---------------------------------------------------------------------------------------------


class WorldModelNet(nn.Module):
    """The raw network F(c_in x, c_noise, actions) of EDM: latents in, latents out, heads on the side.

    EDMPrecond passes one tensor back, so the reward and termination outputs go out through the
    `heads_out` dict the caller hands in.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.patch_in = nn.Linear(cfg.token_channels, d)
        # The direct path (module doc). Zero-initialised: a model warm-started from weights without
        # it computes exactly what it did, and the path still learns (its gradient is not zero).
        self.prev_in = None
        if cfg.prev_frames:
            self.prev_in = nn.Linear(cfg.prev_frames * cfg.token_channels, d)
            nn.init.zeros_(self.prev_in.weight)
            nn.init.zeros_(self.prev_in.bias)
        # Learned position per token of a frame: the SSM and MLP have no other notion of where a
        # token is (attention has RoPE). Same for every frame, so streaming is unaffected.
        self.pos = nn.Parameter(torch.randn(cfg.tokens_per_frame, d) * 0.02)
        self.noise_emb = NoiseLevelEmbedding(d)
        self.action_emb = ActionEmbedding(cfg)
        self.blocks = nn.ModuleList(create_block(cfg, i) for i in range(cfg.n_layers))
        self.final = FinalLayer(d, cfg.token_channels)
        self.local_head = LocalHead(cfg) if cfg.local_head else None
        self.heads = RewardTerminationHead(d)

    def forward(
        self,
        x_in: torch.Tensor,
        c_noise: torch.Tensor,
        actions: torch.Tensor | None = None,
        no_action: torch.Tensor | None = None,
        cache: WorldModelCache | None = None,
        heads_out: dict[str, torch.Tensor] | None = None,
        prev: torch.Tensor | None = None,
        frame: FrameStep | None = None,
        commit: bool = True,
    ) -> torch.Tensor:
        """x_in (B, T, C, h, w), c_noise (B, T), actions (B, T[, D]) -> F (B, T, C, h, w).

        prev (B, T, K, C, h, w): the clean latents of the K frames before each frame (K = cfg.prev_frames).
        frame: one new frame (T = 1) of a `FrameStep`, which holds the actions, cache and previous
        frames (`step` below); commit=False leaves the cache as it was.
        """
        if frame is not None:
            return self.step(x_in, c_noise, frame, commit, heads_out)
        cfg = self.cfg
        dtype = self.patch_in.weight.dtype
        tokens = patchify(x_in.to(dtype), cfg.patch)  # (B, T, N, C p p)
        x = self.patch_in(tokens) + self.pos  # (B, T, N, d)
        if self.prev_in is not None:
            B, T = x_in.shape[:2]
            stacked = prev.to(dtype).reshape(B, T, -1, *cfg.latent_grid)  # (B, T, K C, h, w)
            x = x + self.prev_in(patchify(stacked, cfg.patch))  # (B, T, N, d)
        c = self.noise_emb(c_noise) + self.action_emb(actions, no_action)  # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, c, None if cache is None else cache.layers[i])
        if heads_out is not None:
            heads_out["reward"], heads_out["termination_logit"] = self.heads(x)  # (B, T) each
        out = self.final(x, c)  # (B, T, N, C p p)
        out = unpatchify(out, cfg.latent_channels, cfg.token_grid, cfg.patch)  # (B, T, C, h, w)
        if self.local_head is not None:
            out = self.local_head(out, x_in, self.local_head.prev_part(prev), F.silu(c))
        return out

    def step(self, x_in: torch.Tensor, c_noise: torch.Tensor, frame: FrameStep, commit: bool,
             heads_out: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """`forward` for one new frame, x_in (B, 1, C, h, w), c_noise (B, 1), through the blocks'
        `step`, with what the frame's calls share taken from `frame` (module doc)."""
        cfg = self.cfg
        B = x_in.shape[0]
        tokens = patchify(x_in.to(self.patch_in.weight.dtype), cfg.patch)  # (B, 1, N, C p p)
        # patch_in(tokens) + pos + prev_in(previous frames), the last two folded into frame.token_bias
        x = torch.addmm(frame.token_bias, tokens.reshape(B * cfg.tokens_per_frame, -1), self.patch_in.weight.t())
        x = x.view(B, cfg.tokens_per_frame, -1)  # (B, N, d)
        c_act = F.silu(self.noise_emb(c_noise[:, 0]) + frame.action_emb)  # (B, d): every adaLN reads silu(c)
        for block, layer_frame in zip(self.blocks, frame.layers):
            x = block.step(x, c_act, layer_frame, commit)
        x = x[:, None]  # (B, 1, N, d)
        if heads_out is not None:
            heads_out["reward"], heads_out["termination_logit"] = self.heads(x)  # (B, 1) each
        out = self.final.step(x[:, 0], c_act)[:, None]  # (B, 1, N, C p p)
        out = unpatchify(out, cfg.latent_channels, cfg.token_grid, cfg.patch)  # (B, 1, C, h, w)
        if self.local_head is not None:
            out = self.local_head(out, x_in, frame.local_prev_part, c_act[:, None])
        return out


@dataclass
class WorldModelOutput:
    denoised: torch.Tensor
    """(B, T, C, h, w) the denoiser's estimate of the clean frames ((B, C, h, w) from `step`)."""
    reward: torch.Tensor
    """(B, T) predicted reward of the transition into each frame; meaningful for clean (sigma = 0) inputs."""
    termination_logit: torch.Tensor
    """(B, T) logit that the frame is terminal; same caveat."""


class WorldModel(nn.Module):
    """EDM-preconditioned world model: D(x; sigma, actions) per frame, plus reward / termination heads.

    forward(x_noisy (B, T, C, h, w), sigma (B, T), actions (B, T) int | (B, T, D) float, cache=None)
    Frame t is conditioned on actions[:, t], the action that LED TO frame t (use
    `conditioning.shift_actions` on data-aligned actions); a first frame has no action: index
    cfg.n_actions for discrete actions, or no_action[:, t] = True.
    """

    def __init__(self, cfg: ModelConfig, sigma_data: float = 1.0):
        super().__init__()
        self.cfg = cfg
        self.precond = EDMPrecond(WorldModelNet(cfg), EDMConfig(sigma_data=sigma_data))

    @property
    def net(self) -> WorldModelNet:
        return self.precond.net

    @property
    def sigma_data(self) -> float:
        return self.precond.sigma_data

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- input checks --------------------------------------------------------------------------

    def _check_latents(self, x_noisy: torch.Tensor, sigma: torch.Tensor, lead: tuple[int, ...]) -> None:
        cfg = self.cfg
        frame = (cfg.latent_channels, *cfg.latent_grid)
        if tuple(x_noisy.shape) != (*lead, *frame):
            names = "(B, T, C, h, w)" if len(lead) == 2 else "(B, C, h, w)"
            raise ValueError(f"x_noisy must be {names} with (C, h, w) = {frame}, got {tuple(x_noisy.shape)}")
        if tuple(sigma.shape) != lead:
            raise ValueError(f"sigma must have shape {lead} (one noise level per frame), got {tuple(sigma.shape)}")
        # sigma >= 0 is False for NaN, sigma < inf for inf: one check for "finite, non-negative".
        # Skipped while torch.compile traces: reading the values would break the graph, and the
        # compiled training step draws its sigmas itself.
        if not sigma.dtype.is_floating_point or (
                not torch.compiler.is_compiling() and not bool(((sigma >= 0) & (sigma < float("inf"))).all())):
            raise ValueError("sigma must be finite, non-negative floats (0 = clean context frame)")

    def _check_actions_and_cache(self, actions: torch.Tensor, no_action: torch.Tensor | None,
                                 cache: WorldModelCache | None, lead: tuple[int, ...]) -> None:
        self.net.action_emb.check(actions, lead, no_action)
        if cache is not None and cache.batch_size != lead[0]:
            raise ValueError(f"cache holds {cache.batch_size} streams, input has batch {lead[0]}")
        if cache is not None and len(cache.layers) != self.cfg.n_layers:
            raise ValueError(f"cache has {len(cache.layers)} layers, model has {self.cfg.n_layers}")

    def _check_inputs(self, x_noisy: torch.Tensor, sigma: torch.Tensor, actions: torch.Tensor,
                      no_action: torch.Tensor | None, cache: WorldModelCache | None, lead: tuple[int, ...]) -> None:
        self._check_latents(x_noisy, sigma, lead)
        self._check_actions_and_cache(actions, no_action, cache, lead)

    # -- entry points --------------------------------------------------------------------------

    def forward(
        self,
        x_noisy: torch.Tensor,
        sigma: torch.Tensor,
        actions: torch.Tensor,
        cache: WorldModelCache | None = None,
        no_action: torch.Tensor | None = None,
        clean: torch.Tensor | None = None,
    ) -> WorldModelOutput:
        """All T frames in parallel (training). With a cache: they continue its streams and the
        cache is advanced past them (prefill). Frames with sigma = 0 come back exactly.

        clean (B, T, C, h, w): the clean latents behind x_noisy, which the direct path
        (cfg.prev_frames > 0) shows each frame for the frames before it. Training passes them;
        None takes x_noisy itself, right for a prefill of clean frames (sigma = 0).
        """
        B, T = x_noisy.shape[:2]
        self._check_inputs(x_noisy, sigma, actions, no_action, cache, (B, T))
        prev = None
        K = self.cfg.prev_frames
        if K:
            clean = x_noisy if clean is None else clean
            if clean.shape != x_noisy.shape:
                raise ValueError(f"clean must have the shape of x_noisy {tuple(x_noisy.shape)}, got {tuple(clean.shape)}")
            before = cache.recent if cache is not None else clean.new_zeros(B, K, *clean.shape[2:])
            seq = torch.cat([before.to(clean), clean], dim=1)  # (B, K + T, C, h, w)
            prev = torch.stack([seq[:, j : j + T] for j in range(K)], dim=2)  # (B, T, K, C, h, w), oldest first
        heads: dict[str, torch.Tensor] = {}
        denoised = self.precond(x_noisy, sigma, actions, no_action=no_action, cache=cache, heads_out=heads, prev=prev)
        if cache is not None:
            cache.frames_seen += T
            if K:
                cache.recent = seq[:, T:].to(cache.recent).clone()  # the last K frames
        return WorldModelOutput(denoised, heads["reward"], heads["termination_logit"])

    def step(
        self,
        x_noisy: torch.Tensor,
        sigma: torch.Tensor,
        action: torch.Tensor,
        cache: WorldModelCache,
        no_action: torch.Tensor | None = None,
        commit: bool = True,
    ) -> WorldModelOutput:
        """One new frame per stream: x_noisy (B, C, h, w), sigma (B,), action (B,) | (B, D).

        commit=True advances `cache` by this frame (do it with the clean frame, sigma = 0, once
        the sampler has produced it); commit=False leaves `cache` untouched (denoising steps):
        the layers read their state and write nothing back, so no copy of the cache is made.
        Costs the same whatever the number of frames already streamed (except causal_full).
        """
        if cache is None:
            raise ValueError("step needs a cache; create one with allocate_cache(batch)")
        self._check_inputs(x_noisy, sigma, action, no_action, cache, (x_noisy.shape[0],))
        return FrameStep(self, cache, action, no_action).run(x_noisy, sigma, commit)

    def begin_frame(self, cache: WorldModelCache, action: torch.Tensor,
                    no_action: torch.Tensor | None = None, *, actions_checked: bool = False) -> FrameStep:
        """The next frame of `cache`'s streams under action (B,) | (B, D): a `FrameStep` whose
        `denoise` and `commit` are `step` with commit=False / True, sharing their common work.
        Use it when one frame takes several calls (the sampler); inference only.
        actions_checked: the caller has validated the actions already (`RolloutSession` does, on
        the host), so the value-range check, a device sync on a GPU, is skipped here."""
        if cache is None:
            raise ValueError("begin_frame needs a cache; create one with allocate_cache(batch)")
        if not actions_checked:
            self._check_actions_and_cache(action, no_action, cache, (cache.batch_size,))
        elif cache.batch_size != action.shape[0]:
            raise ValueError(f"cache holds {cache.batch_size} streams, actions have batch {action.shape[0]}")
        return FrameStep(self, cache, action, no_action)

    def allocate_cache(self, batch: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> WorldModelCache:
        """Empty streaming state for `batch` streams (= starting `forward` with no past).
        Defaults: the parameters' device and dtype."""
        layers = []
        for block in self.net.blocks:
            layers.append(LayerCache(
                None if block.ssm is None else block.ssm.allocate_cache(batch, device, dtype),
                None if block.attn is None else block.attn.allocate_cache(batch, device, dtype),
            ))
        recent = None
        if self.cfg.prev_frames:
            p = self.net.patch_in.weight
            recent = torch.zeros(batch, self.cfg.prev_frames, self.cfg.latent_channels, *self.cfg.latent_grid,
                                 device=p.device if device is None else device, dtype=p.dtype if dtype is None else dtype)
        return WorldModelCache(layers, recent=recent)


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the model `cfg` describes, counted without allocating them (meta device)."""
    with torch.device("meta"):
        return WorldModel(cfg).num_parameters()


def widen_to_parameters(cfg: ModelConfig, target: int, step: float = 0.25) -> ModelConfig:
    """`cfg` with its MLPs widened (or narrowed) so that its parameter count is the nearest to
    `target` that `mlp_ratio` in multiples of `step` allows: a baseline compared with another model
    at an equal parameter budget (a sliding-window transformer has no SSM to spend them on)."""
    def count(ratio: float) -> int:
        return parameter_count(dataclasses.replace(cfg, mlp_ratio=ratio))

    ratio = max(step, round(cfg.mlp_ratio / step) * step)
    direction = step if count(ratio) < target else -step
    while ratio + direction >= step and abs(count(ratio + direction) - target) < abs(count(ratio) - target):
        ratio += direction
    return dataclasses.replace(cfg, mlp_ratio=ratio)
