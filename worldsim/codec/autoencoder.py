"""A small convolutional frame autoencoder: uint8 frames (..., H, W, 3) <-> latents (..., C, h, w).

Layout (like the first stage of latent diffusion, scaled down for a 2-core CPU):
  encoder: conv 3x3 -> per level [ResBlock x n, strided conv 3x3 (halves H, W)] -> ResBlock
           -> GroupNorm, SiLU, conv 3x3 to `latent_channels`
  decoder: the mirror image, upsampling by nearest-neighbour + conv 3x3 (no transposed convs,
           which leave checkerboard artefacts).

The latent is deterministic (no KL term). A KL-regularised VAE keeps its latent smooth and
bounded by injecting noise during training; here the noise would cost reconstruction quality on
a tiny model, and what the diffusion model needs from the latent (roughly unit scale per channel)
is given directly by the per-channel normalisation below. The world model adds its own noise.

Latent normalisation: `latent_mean` / `latent_std` (C,) are buffers measured on training frames
after (and during) training and saved with the weights. `encode` returns normalised latents and
`decode` undoes the normalisation, so users of the codec only ever see ~zero-mean, unit-variance
channels. `encode_raw` / `decode_raw` work on the raw latents (what the codec is trained on).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from worldsim.utils import cpu


# ----------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class CodecConfig:
    image_size: int = 64
    """Frames are square, image_size x image_size."""
    image_channels: int = 3
    """Channels of the input frames (3: RGB)."""
    channels: tuple[int, ...] = (16, 32, 64, 64)
    """Feature channels per resolution level; len(channels) - 1 stride-2 downsamplings."""
    blocks_per_level: int = 1
    """Residual blocks per level, in the encoder and in the decoder."""
    latent_channels: int = 16
    """Channels C of the latent grid."""
    norm_groups: int = 8
    """GroupNorm groups; must divide every entry of `channels`."""

    def __post_init__(self) -> None:
        # A JSON round trip turns the tuple into a list; keep the dataclass hashable and comparable.
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        self.validate()

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one frame's latent."""
        return (self.latent_channels, self.latent_size, self.latent_size)

    def validate(self) -> None:
        if len(self.channels) < 1 or min(self.channels) < 1:
            raise ValueError(f"channels must be non-empty positive ints, got {self.channels}")
        if self.image_size % self.downsample:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by the total downsampling "
                f"{self.downsample} of {len(self.channels)} levels"
            )
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"norm_groups {self.norm_groups} does not divide channels {bad}")
        if self.blocks_per_level < 1 or self.latent_channels < 1 or self.image_channels < 1:
            raise ValueError("blocks_per_level, latent_channels and image_channels must be >= 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CodecConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown codec config fields {unknown} (known: {sorted(known)})")
        return cls(**d)


PRESETS: dict[str, CodecConfig] = {
    # For tests: 64x64 -> 16x16x4, a few thousand parameters.
    "tiny": CodecConfig(channels=(8, 16, 16), latent_channels=4, norm_groups=4),
    # 64x64x3 -> 8x8x16 (12x fewer numbers than the frame): 64 tokens per frame keeps the
    # world model's sequence short enough to train on a CPU.
    "small": CodecConfig(channels=(16, 32, 64, 64), latent_channels=16),
    # 64x64x3 -> 16x16x4 (same 12x compression, 256 tokens per frame): finer grid for a GPU.
    "small-f4": CodecConfig(channels=(32, 64, 64), latent_channels=4),
    # Wider 8x8x16 codec, for training on a GPU.
    "base": CodecConfig(
        channels=(64, 128, 256, 256), blocks_per_level=2, latent_channels=16, norm_groups=32
    ),
}


def preset(name: str, **overrides) -> CodecConfig:
    """A named preset, optionally with some fields changed (e.g. image_size for small frames)."""
    if name not in PRESETS:
        raise ValueError(f"unknown codec preset {name!r}; choose from {sorted(PRESETS)}")
    return CodecConfig.from_dict({**PRESETS[name].to_dict(), **overrides})


# ------------------------------------------------------------------------------- primitives
class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv 3x3, twice, plus a skip (1x1 conv when channels change)."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # Zero-init the last conv: each block starts as the identity, so the stack trains at once.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, c_in, H, W) -> (B, c_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, c_in, H, W) -> (B, c_out, H/2, W/2)
        return self.conv(x)


# Sub-pixel form of "nearest 2x upsampling, then conv 3x3": output row 2i + a sees upsampled rows
# 2i + a - 1 .. 2i + a + 1, i.e. input rows (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1.
# _FOLD[a] (2 taps x 3 kernel rows) sums the kernel rows that land on the same input row; the
# same holds for columns.
_FOLD = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],   # a = 0: taps at input rows i - 1, i
                      [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # a = 1: taps at input rows i, i + 1


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then conv 3x3.

    Without gradients (decoding frames) the same map runs in its sub-pixel form: each of the four
    output phases (a, b) = (row % 2, column % 2) is a 2x2 convolution of the low-resolution input
    with kernels folded from the 3x3 one. That is 4/9 of the multiply-adds and no upsampled copy
    of the input (the decoder ran 10-15% faster on a CPU); equal up to float rounding
    (tests/test_codec.py). Training keeps the plain form.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self._folded: tuple[tuple, torch.Tensor] | None = None  # (weight version, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, c_in, H, W) -> (B, c_out, 2H, 2W)
        if torch.is_grad_enabled():
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.forward_subpixel(x)

    def _subpixel_kernels(self) -> torch.Tensor:
        """(2, 2, c_out, c_in, 2, 2): the 2x2 kernel of each output phase (a, b), refolded only
        when the weight has changed (an optimizer step or a load bumps its version)."""
        w = self.conv.weight  # (c_out, c_in, 3, 3)
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if self._folded is None or self._folded[0] != key:
            fold = _FOLD.to(w.device, w.dtype)
            with torch.autocast(w.device.type, enabled=False):  # kept in w's dtype; autocast casts per call
                self._folded = (key, torch.einsum("ark,oikl,bsl->aboirs", fold, w.detach(), fold))
        return self._folded[1]

    def forward_subpixel(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        kernels = self._subpixel_kernels()
        padded = F.pad(x, (1, 1, 1, 1))  # (B, c_in, H + 2, W + 2)
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        out = torch.empty(B, kernels.shape[2], 2 * H, 2 * W, dtype=x.dtype, device=x.device, memory_format=layout)
        for a in range(2):
            for b in range(2):
                # Phase (a, b) reads input rows i - 1 + a .. i + a, i.e. padded rows a .. a + H.
                out[:, :, a::2, b::2] = F.conv2d(padded[:, :, a : a + H + 1, b : b + W + 1], kernels[a, b],
                                                 self.conv.bias)  # (B, c_out, H, W)
        return out


# ---------------------------------------------------------------------------- encoder/decoder
class Encoder(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        ch, g = cfg.channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.image_channels, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, c in enumerate(ch):
            layers += [ResBlock(c, c, g) for _ in range(cfg.blocks_per_level)]
            if i + 1 < len(ch):
                layers.append(Downsample(c, ch[i + 1]))
        layers.append(ResBlock(ch[-1], ch[-1], g))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C, h, w)
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class Decoder(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        ch, g = cfg.channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        layers: list[nn.Module] = [ResBlock(ch[-1], ch[-1], g)]
        for i in reversed(range(len(ch))):
            layers += [ResBlock(ch[i], ch[i], g) for _ in range(cfg.blocks_per_level)]
            if i > 0:
                layers.append(Upsample(ch[i], ch[i - 1]))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(g, ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, 3, H, W)
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z)))))


# -------------------------------------------------------------------------------- the codec
DECODE_CHUNK = 16
"""Frames per decoder call in `FrameCodec.decode` on the CPU (see there)."""


class FrameCodec(nn.Module):
    """Frames <-> normalised latents. Pixels are mapped to [-1, 1] inside the network."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        self.register_buffer("latent_mean", torch.zeros(c))
        self.register_buffer("latent_std", torch.ones(c))

    # -------------------------------------------------------------- raw (training) interface
    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [-1, 1] -> raw latents (B, C, h, w)."""
        return self.encoder(x)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, C, h, w) -> (B, 3, H, W), unclamped (the loss sees overshoot)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_raw(self.encode_raw(x))

    # ---------------------------------------------------------------- public frame interface
    def _check_frames(self, frames: torch.Tensor) -> None:
        s, c = self.config.image_size, self.config.image_channels
        if frames.ndim < 3 or tuple(frames.shape[-3:]) != (s, s, c):
            raise ValueError(
                f"frames must have shape (..., {s}, {s}, {c}) (channels last), "
                f"got {tuple(frames.shape)}"
            )

    def encode(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 frames (..., H, W, 3) -> normalised latents (..., C, h, w), float32."""
        frames = torch.as_tensor(frames)
        self._check_frames(frames)
        if frames.dtype != torch.uint8:
            raise TypeError(f"encode takes uint8 frames, got {frames.dtype}")
        lead = frames.shape[:-3]
        x = frames.reshape(-1, *frames.shape[-3:]).to(self.latent_mean.device)  # (B, H, W, 3)
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        z = self.encode_raw(x)  # (B, C, h, w)
        z = (z - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]
        return z.reshape(*lead, *z.shape[1:])

    def decode(self, latents: torch.Tensor, *, as_uint8: bool = False, bf16: bool = False) -> torch.Tensor:
        """Normalised latents (..., C, h, w) -> frames (..., H, W, 3): float in [0, 1], or uint8.

        bf16: run the decoder's convolutions in bfloat16 (autocast). On CPUs with AMX tiles it
        decodes a batch of 64 about twice as fast (`bf16_decode_pays`); frames differ from float32
        ones by a grey level or two (about 56 dB apart on the bundled codec), so evaluations keep float32."""
        shape = self.config.latent_shape
        if latents.ndim < 3 or tuple(latents.shape[-3:]) != shape:
            want = ", ".join(map(str, shape))
            raise ValueError(f"latents must have shape (..., {want}), got {tuple(latents.shape)}")
        lead = latents.shape[:-3]
        z = latents.reshape(-1, *shape).to(self.latent_mean.device, torch.float32)  # (B, C, h, w)
        z = z * self.latent_std[:, None, None] + self.latent_mean[:, None, None]
        # Channels-last activations run the convolutions ~1.8x faster on the CPU (oneDNN's native
        # layout) and make the (B, H, W, 3) output contiguous. On the CPU, frames go through in
        # chunks whose activations stay in cache: per frame, 16 at a time took 2.6 ms, 64 at a
        # time 3.3 ms and 256 at a time 4.4 ms (`small` codec, 1 thread).
        z = z.contiguous(memory_format=torch.channels_last)
        chunk = DECODE_CHUNK if z.device.type == "cpu" else max(len(z), 1)
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=bf16):
            x = torch.cat([self.decode_raw(part) for part in z.split(chunk)]) if len(z) > chunk else self.decode_raw(z)
        x = ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)  # (B, 3, H, W) in [0, 1]
        x = x.permute(0, 2, 3, 1)  # (B, H, W, 3)
        if as_uint8:
            x = (x * 255.0).round().to(torch.uint8)
        return x.reshape(*lead, *x.shape[1:])

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        c = self.config.latent_channels
        if mean.shape != (c,) or std.shape != (c,):
            raise ValueError(
                f"latent stats must have shape ({c},), got {tuple(mean.shape)}, {tuple(std.shape)}"
            )
        self.latent_mean.copy_(mean)
        # A dead channel (std ~ 0) would blow up after division; floor it.
        self.latent_std.copy_(std.clamp_min(1e-4))


def bf16_decode_pays(device: torch.device | str, batch: int) -> bool:
    """Whether `decode(..., bf16=True)` is the faster choice: on a CPU with AMX and from batch 8.
    Measured with the bundled codec on 1 thread (Xeon with AMX): batch 1 6.7 -> 9.3 ms (slower),
    batch 8 21.9 -> 12.4 ms, batch 64 112 -> 57 ms. Without AMX, bf16 convolutions are emulated."""
    return torch.device(device).type == "cpu" and batch >= 8 and cpu.has_amx()


@torch.no_grad()
def measure_latent_stats(
    codec: FrameCodec, frames: torch.Tensor, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (C,) of the raw latents of uint8 frames (N, H, W, 3)."""
    was_training = codec.training
    codec.eval()
    total = torch.zeros(codec.config.latent_channels, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    count = 0
    device = codec.latent_mean.device
    for i in range(0, len(frames), batch):
        x = frames[i : i + batch].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        z = codec.encode_raw(x).double().cpu()  # (b, C, h, w)
        total += z.sum(dim=(0, 2, 3))
        total_sq += (z * z).sum(dim=(0, 2, 3))
        count += z.shape[0] * z.shape[2] * z.shape[3]
    codec.train(was_training)
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    return mean.float(), var.sqrt().float()


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR (dB) of uint8 frames (N, H, W, C): 10 log10(255^2 / MSE), at most 100."""
    err = (reference.float() - reconstruction.float()).pow(2).flatten(1).mean(dim=1)  # (N,)
    return 10.0 * torch.log10(255.0**2 / err.clamp_min(255.0**2 * 1e-10))
