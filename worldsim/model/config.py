"""World-model configuration: one dataclass, named presets, and the baselines as variants.

The memory evaluation compares LSSVWM against the paper's baselines (Po et al. 2025, arXiv
2505.20171, sec. 5). All of them are the same backbone (`worldsim.model.world_model`) with some
sub-layers switched off or re-shaped, so they differ only in what is being measured:

    variant         per block                         temporal memory
    lssvwm          block-wise SSM + local attn + MLP  SSM state per block + last k frames
    no_blockwise    SSM over the whole grid + local    one SSM state per frame grid (block = grid)
                    attn + MLP
    mamba_only      block-wise SSM + MLP               SSM state only, no attention
    causal_window   attention (k = 16 frames) + MLP    last k frames
    causal_full     attention (all frames) + MLP       every frame (KV cache grows with the horizon)

`make_config("small", "causal_full")` sets the knobs; a hand-built `ModelConfig` is validated
against its `variant` so a checkpoint config that contradicts itself fails loudly on load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

VARIANTS = ("lssvwm", "causal_full", "causal_window", "mamba_only", "no_blockwise")
ACTION_KINDS = ("discrete", "continuous")
CAUSAL_WINDOW_FRAMES = 16
"""Attention window of the `causal_window` baseline (make_config default; override attn_window)."""

_HAS_SSM = {"lssvwm": True, "no_blockwise": True, "mamba_only": True, "causal_full": False, "causal_window": False}
_HAS_ATTN = {"lssvwm": True, "no_blockwise": True, "mamba_only": False, "causal_full": True, "causal_window": True}


def default_ssm_blocks(token_grid: tuple[int, int], n_layers: int) -> tuple[tuple[int, int], ...]:
    """Per-layer block sizes cycling from small to the full grid: (2, 2), (4, 4), ..., (H, W), (2, 2), ...

    Small blocks put a token next to its own past (temporal memory), the full grid keeps the frame
    coherent (the paper varies the block size per layer for this reason). Side lengths are powers
    of two that divide the grid, capped at the grid; the full grid always closes the cycle.
    """
    h, w = token_grid
    sizes: list[tuple[int, int]] = []
    side = 2
    while side < max(h, w):
        block = (min(side, h), min(side, w))
        if h % block[0] == 0 and w % block[1] == 0 and block != (h, w):
            sizes.append(block)
        side *= 2
    sizes.append((h, w))
    return tuple(sizes[i % len(sizes)] for i in range(n_layers))


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    # -- the data ---------------------------------------------------------------------------------
    latent_channels: int
    """C of the codec's latent (C, h, w)."""
    latent_grid: tuple[int, int]
    """(h, w) of the codec's latent."""
    patch: int = 1
    """Latent patching into tokens: p x p latent cells per token; token grid = latent_grid // patch."""
    action_kind: str = "discrete"
    """"discrete" (learned table, actions int64 (B, T)) or "continuous" (MLP, actions float (B, T, action_dim))."""
    n_actions: int = 6
    """Discrete actions; index n_actions is the learned "no action" of a first frame. 0 for continuous."""
    action_dim: int = 0
    """Width of a continuous action vector; 0 for discrete."""

    # -- the backbone -----------------------------------------------------------------------------
    d_model: int
    """Token width."""
    n_layers: int
    """Blocks in the stack (each: [SSM] + [local attention] + MLP, by variant)."""
    n_heads: int
    """Attention heads (head_dim = d_model / n_heads, even and >= 6 for the 3-axis RoPE)."""
    mlp_ratio: float = 4.0
    """MLP hidden width / d_model."""
    ssm_blocks: tuple[tuple[int, int], ...] | None = None
    """SSM block size (b_h, b_w) per layer, in tokens; None = `default_ssm_blocks`; () without SSM."""
    d_state: int = 16
    """SSM state size per head."""
    ssm_head_dim: int = 32
    """Channels per SSM head (ssm_expand * d_model must be a multiple)."""
    ssm_expand: int = 2
    """SSM inner width / d_model."""
    d_conv: int = 4
    """SSM causal conv length along each block's sequence."""
    attn_window: int | None = 9
    """Frames before the current one each frame attends to (None = full causal); None without attention."""
    prev_frames: int = 0
    """Clean latents of the previous frames fed straight into each frame's tokens (a direct path,
    as DIAMOND stacks its context frames); 0 = none. See `world_model` on why it matters."""
    local_head: int = 0
    """Hidden channels of a small conv net at latent resolution that refines the network's output
    from the frame's own noisy latents and the direct path's previous frames (`world_model.LocalHead`);
    0 = none."""
    variant: str = "lssvwm"
    """"lssvwm" | "causal_full" | "causal_window" | "mamba_only" | "no_blockwise" (module doc)."""

    # -- kernels ----------------------------------------------------------------------------------
    attn_backend: str = "auto"
    """Frame attention backend (see `frame_attention.resolve_backend`)."""
    ssm_backend: str = "auto"
    """SSD scan backend (see `ssd.ssd_chunked`)."""
    ssm_chunk_size: int | None = None
    """SSD chunk length; None picks per device."""

    # -- the loss ---------------------------------------------------------------------------------
    reward_loss_weight: float = 1.0
    """Weight of the reward MSE next to the denoising loss."""
    termination_loss_weight: float = 1.0
    """Weight of the termination BCE next to the denoising loss."""

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so configs compare equal and stay hashable.
        object.__setattr__(self, "latent_grid", tuple(int(v) for v in self.latent_grid))
        if self.ssm_blocks is None:
            blocks = default_ssm_blocks(self.token_grid, self.n_layers) if self.has_ssm else ()
        else:
            blocks = tuple(tuple(int(v) for v in b) for b in self.ssm_blocks)
        object.__setattr__(self, "ssm_blocks", blocks)
        self.validate()

    # -- derived ----------------------------------------------------------------------------------

    @property
    def has_ssm(self) -> bool:
        return _HAS_SSM.get(self.variant, False)

    @property
    def has_attention(self) -> bool:
        return _HAS_ATTN.get(self.variant, False)

    @property
    def token_grid(self) -> tuple[int, int]:
        return (self.latent_grid[0] // self.patch, self.latent_grid[1] // self.patch)

    @property
    def tokens_per_frame(self) -> int:
        return self.token_grid[0] * self.token_grid[1]

    @property
    def token_channels(self) -> int:
        """Latent values per token: C * p * p."""
        return self.latent_channels * self.patch * self.patch

    # -- checks -----------------------------------------------------------------------------------

    def validate(self) -> None:
        """ValueError naming the first inconsistency."""
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {VARIANTS}")
        if self.action_kind not in ACTION_KINDS:
            raise ValueError(f"unknown action_kind {self.action_kind!r}; expected one of {ACTION_KINDS}")
        if self.action_kind == "discrete" and (self.n_actions < 1 or self.action_dim != 0):
            raise ValueError(f"discrete actions need n_actions >= 1 and action_dim 0, got {self.n_actions}, {self.action_dim}")
        if self.action_kind == "continuous" and (self.action_dim < 1 or self.n_actions != 0):
            raise ValueError(f"continuous actions need action_dim >= 1 and n_actions 0, got {self.action_dim}, {self.n_actions}")
        if len(self.latent_grid) != 2 or min(self.latent_grid) < 1 or self.latent_channels < 1:
            raise ValueError(f"latent (C, h, w) must be positive, got C={self.latent_channels}, grid={self.latent_grid}")
        if self.patch < 1 or self.latent_grid[0] % self.patch or self.latent_grid[1] % self.patch:
            raise ValueError(f"patch {self.patch} must divide the latent grid {self.latent_grid}")
        if self.prev_frames < 0:
            raise ValueError(f"prev_frames must be >= 0, got {self.prev_frames}")
        if self.local_head < 0:
            raise ValueError(f"local_head must be >= 0, got {self.local_head}")
        if min(self.d_model, self.n_layers, self.n_heads) < 1:
            raise ValueError("d_model, n_layers and n_heads must be >= 1")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

        if self.has_ssm:
            if len(self.ssm_blocks) != self.n_layers:
                raise ValueError(f"ssm_blocks has {len(self.ssm_blocks)} entries for n_layers={self.n_layers}")
            h, w = self.token_grid
            for i, (bh, bw) in enumerate(self.ssm_blocks):
                if bh < 1 or bw < 1 or h % bh or w % bw:
                    raise ValueError(f"ssm_blocks[{i}] = {(bh, bw)} does not tile the token grid {self.token_grid}")
            full = [b == self.token_grid for b in self.ssm_blocks]
            if self.variant == "no_blockwise" and not all(full):
                raise ValueError(f"variant no_blockwise needs every SSM block == token grid {self.token_grid}, got {self.ssm_blocks}")
            if self.variant == "lssvwm" and all(full):
                raise ValueError("variant lssvwm with every SSM block == the token grid is no_blockwise; use that variant")
        elif self.ssm_blocks:
            raise ValueError(f"variant {self.variant} has no SSM layers; ssm_blocks must be empty, got {self.ssm_blocks}")

        if self.has_attention:
            if self.variant == "causal_full" and self.attn_window is not None:
                raise ValueError(f"variant causal_full attends to every frame: attn_window must be None, got {self.attn_window}")
            if self.variant != "causal_full" and (self.attn_window is None or self.attn_window < 0):
                raise ValueError(f"variant {self.variant} needs a finite attn_window >= 0, got {self.attn_window}")
        elif self.attn_window is not None:
            raise ValueError(f"variant {self.variant} has no attention; attn_window must be None, got {self.attn_window}")

    # -- serialisation ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists); `from_dict` inverts it."""
        d = dataclasses.asdict(self)
        d["latent_grid"] = list(self.latent_grid)
        d["ssm_blocks"] = [list(b) for b in self.ssm_blocks]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`. Unknown keys (a config from other code) and missing required keys are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; this code knows {sorted(names)}")
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"ModelConfig is missing required keys {missing}")
        return cls(**d)


# Sizes: tiny for tests (< 100k parameters, seconds per step), small for hours on a 2-core CPU
# (a few M), base for a GPU (~190M, the paper's scale). Latent shape: the default codec's
# (16, 8, 8); the trainer overrides it from the codec it uses.
# cpu: "small" made ~7x faster to train on a CPU (window 16, batch 8, one thread, torch 2.13:
# 3.62 -> 0.51 s per forward + backward + AdamW step, 2.8M -> 2.3M parameters). Nearly all of the
# gain is patch 2: 2 x 2 latent cells per token give 16 tokens per frame instead of 64, 4x fewer
# tokens through every linear layer and 16x less attention (window 9 over 16 frames is ~60% of a
# dense 1024 x 1024 score matrix at patch 1). ssm_expand 1 and mlp_ratio 3 take the last ~25%,
# keeping the 6 layers (three cycles of 2x2 / 4x4 SSM blocks) that carry the temporal memory.
# prev_frames=2: the direct path to the two previous clean frames (`world_model` module doc), the
# bundled model's recipe since it was measured to help; ~16k parameters.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(latent_channels=16, latent_grid=(8, 8), d_model=32, n_layers=2, n_heads=2,
                        d_state=8, ssm_head_dim=16),
    "small": ModelConfig(latent_channels=16, latent_grid=(8, 8), d_model=128, n_layers=6, n_heads=4,
                         d_state=16, ssm_head_dim=32),
    "cpu": ModelConfig(latent_channels=16, latent_grid=(8, 8), patch=2, d_model=128, n_layers=6, n_heads=4,
                       mlp_ratio=3.0, d_state=16, ssm_head_dim=32, ssm_expand=1, prev_frames=2),
    "base": ModelConfig(latent_channels=16, latent_grid=(8, 8), d_model=768, n_layers=12, n_heads=12,
                        d_state=64, ssm_head_dim=64),
}


def make_config(preset: str | ModelConfig, variant: str = "lssvwm", **overrides: Any) -> ModelConfig:
    """A preset (a name, or any config: e.g. a trained model's) turned into `variant`, then
    `overrides` applied (any ModelConfig field).

    The variant sets its knobs (SSM blocks, attention window) unless they are overridden:
    causal_full -> window None, no SSM; causal_window -> window 16, no SSM; mamba_only -> SSM
    blocks of the preset, no attention; no_blockwise -> every block = the token grid.
    """
    if not isinstance(preset, ModelConfig) and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"unknown ModelConfig fields {unknown}")
    base = preset if isinstance(preset, ModelConfig) else PRESETS[preset]
    knobs: dict[str, Any] = {"variant": variant}
    if variant in ("causal_full", "causal_window"):
        knobs["ssm_blocks"] = ()
        knobs["attn_window"] = None if variant == "causal_full" else CAUSAL_WINDOW_FRAMES
    elif variant == "mamba_only":
        knobs["attn_window"] = None
    # ssm_blocks depend on the (possibly overridden) latent grid, patch and depth: resolve them
    # after the overrides unless the caller gave them.
    if _HAS_SSM[variant] and "ssm_blocks" not in overrides:
        knobs["ssm_blocks"] = None
    merged = {**base.to_dict(), **knobs, **overrides}
    if variant == "no_blockwise" and "ssm_blocks" not in overrides:
        grid = (merged["latent_grid"][0] // merged["patch"], merged["latent_grid"][1] // merged["patch"])
        merged["ssm_blocks"] = [list(grid)] * merged["n_layers"]
    return ModelConfig.from_dict(merged)
