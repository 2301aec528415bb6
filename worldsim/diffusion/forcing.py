"""Diffusion-forcing training noise and the masked EDM loss.

Diffusion forcing (Chen et al., "Diffusion Forcing: Next-token Prediction Meets Full-Sequence
Diffusion", NeurIPS 2024, arXiv 2407.01392): every frame of a training window gets its OWN noise
level, drawn independently. A causal denoiser trained this way sees every mix of clean and noisy
past frames, so at inference "clean past, one noisy new frame" is in-distribution.

Long-context training (LSSVWM, Po et al. 2025, arXiv 2505.20171): per-frame independent noise
leaves the model little reason to use far-away frames, since the near past is as noisy as the far
past. With probability p (0.5) per sample, a random clean prefix longer than half the window is
kept at noise 0 and only the remaining (noised) frames are in the loss: the model must predict
the rest from a long clean context, which is what a long-horizon rollout asks of it.
`min_sigma_after_prefix` strengthens that: the frames after the prefix are all kept noisy, so
those beyond the attention window can lean only on what the state kept of the prefix.

Noise levels follow EDM's training distribution, ln sigma ~ N(p_mean, p_std^2) (Karras et al.
2022, arXiv 2206.00364, sec. 5), drawn per frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from worldsim.diffusion.edm import EDMPrecond, edm_loss_weight


@dataclass(frozen=True)
class ForcingConfig:
    p_mean: float = -0.4
    """Mean of ln(sigma). EDM used -1.2 for images at sigma_data 0.5; video frames conditioned on
    context spend more of their difficulty at mid noise (DIAMOND's choice is also -0.4)."""
    p_std: float = 1.2
    """Std of ln(sigma)."""
    p_long_context: float = 0.5
    """Probability, per sample, of a clean prefix of length in (T/2, T) excluded from the loss."""
    direct_noise: float = 0.0
    """Noise augmentation of the direct path (`world_model_loss`): each frame's clean latent, as
    the frames after it see it there, gets Gaussian noise of std drawn uniformly in [0, this].
    0 = off (and no extra random numbers drawn)."""
    noised_direct: float = 0.0
    """Probability, per window with a clean prefix, that the direct path shows the frames after the
    prefix as noised as the backbone sees them, instead of clean (`world_model_loss`). The paper's
    long-context training makes the far past worth remembering by noising the near past; a clean
    direct path hands every frame its clean predecessor and undoes that. 0 = off (no extra random
    numbers drawn)."""
    min_sigma_after_prefix: float = 0.0
    """Memory training: in windows with a clean prefix, the frames after it draw their noise level
    from the same log-normal cut below at this sigma (0 = off, no extra random numbers). Latents
    have unit std, so above ~2 a noised frame tells little about itself or its neighbours, and the
    frames more than an attention window after the prefix can be predicted well only from what the
    state kept of it: the far past is made worth remembering, where independent noise per frame
    leaves many nearly clean frames close by."""
    own_context: float = 0.0
    """Probability, per window, that its context is the model's own one-step predictions instead
    of the real frames (`world_model_loss`): the direct path of every frame and the clean prefix
    the backbone reads. 0 = off (no extra passes, no extra random numbers)."""

    def __post_init__(self) -> None:
        # Checked here, once, so every user of a config (trainer, GPU job, benchmarks) fails on
        # construction rather than at its first training step.
        if self.min_sigma_after_prefix < 0:
            raise ValueError(f"min_sigma_after_prefix must be >= 0, got {self.min_sigma_after_prefix}")
        if not 0.0 <= self.p_long_context <= 1.0:
            raise ValueError(f"p_long_context must be in [0, 1], got {self.p_long_context}")


def sample_training_noise(
    batch: int,
    T: int,
    generator: torch.Generator | None = None,
    cfg: ForcingConfig = ForcingConfig(),
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame noise levels for one training batch of windows of T frames.

    Returns sigma (B, T) float32 and loss_mask (B, T) bool. Frames of a clean prefix have
    sigma = 0 and loss_mask False; every other frame has an independent log-normal sigma > 0 and
    loss_mask True. `device` defaults to the generator's device.
    """
    shortest = T // 2 + 1  # strictly more than half the window
    longest = T - 1  # at least one noised frame, or the sample teaches nothing
    if cfg.p_long_context > 0 and shortest > longest:
        raise ValueError(
            f"a clean prefix longer than T/2 and shorter than T needs T >= 3 frames, got T={T}; "
            "use longer windows or p_long_context=0"
        )
    if device is None:
        device = generator.device if generator is not None else "cpu"

    # Draw everything for every sample (used or not) so the stream of random numbers, and hence
    # the batch, depends only on (seed, batch, T), not on which samples got a prefix.
    log_sigma = torch.randn(batch, T, generator=generator, device=device) * cfg.p_std + cfg.p_mean
    sigma = log_sigma.exp()  # (B, T), independent per frame
    has_prefix = torch.rand(batch, generator=generator, device=device) < cfg.p_long_context  # (B,)
    length = torch.randint(
        shortest, max(longest, shortest) + 1, (batch,), generator=generator, device=device
    )  # (B,), uniform over the allowed prefix lengths
    length = torch.where(has_prefix, length, torch.zeros_like(length))

    frame = torch.arange(T, device=device)  # (T,)
    in_prefix = frame[None, :] < length[:, None]  # (B, T)
    if cfg.min_sigma_after_prefix > 0:  # ln sigma ~ N(p_mean, p_std^2) cut below, by the inverse CDF
        floor = 0.5 * math.erfc(-(math.log(cfg.min_sigma_after_prefix) - cfg.p_mean) / (cfg.p_std * math.sqrt(2)))
        u = floor + (1 - floor) * torch.rand(batch, T, generator=generator, device=device)  # the CDF above the cut
        high = (torch.special.ndtri(u.clamp(max=1 - 1e-7)) * cfg.p_std + cfg.p_mean).exp()
        sigma = torch.where(has_prefix[:, None], high.clamp_min(cfg.min_sigma_after_prefix), sigma)
    sigma = torch.where(in_prefix, torch.zeros_like(sigma), sigma)
    return sigma, ~in_prefix


def masked_denoising_loss(
    denoised: torch.Tensor,
    clean: torch.Tensor,
    sigma: torch.Tensor,
    loss_mask: torch.Tensor,
    sigma_data: float,
) -> torch.Tensor:
    """EDM-weighted MSE, averaged over the frames where loss_mask is True (over the whole batch).

    denoised, clean (B, T, ...); sigma, loss_mask (B, T). Per frame: lambda(sigma) * mean over the
    frame's elements of (denoised - clean)^2. A batch with no frame in the loss gives 0 (and zero
    gradients), not NaN.
    """
    err = (denoised.float() - clean.float()).square().flatten(2).mean(-1)  # (B, T)
    # Masked frames may have sigma = 0 (infinite weight): give them a harmless sigma before weighting.
    safe_sigma = torch.where(loss_mask, sigma.float(), torch.ones_like(sigma, dtype=torch.float32))
    weighted = edm_loss_weight(safe_sigma, sigma_data) * err  # (B, T)
    weighted = torch.where(loss_mask, weighted, torch.zeros_like(weighted))
    return weighted.sum() / loss_mask.sum().clamp_min(1)


class DiffusionForcingLoss:
    """One training loss evaluation: draw per-frame noise, denoise the window, masked EDM loss.

    `loss = DiffusionForcingLoss(cfg)(precond, clean (B, T, C, h, w), actions, generator=g)`;
    extra positional / keyword arguments go to the network (actions, ...).
    """

    def __init__(self, cfg: ForcingConfig = ForcingConfig()):
        self.cfg = cfg

    def __call__(
        self,
        precond: EDMPrecond,
        clean: torch.Tensor,
        *net_args,
        generator: torch.Generator | None = None,
        **net_kwargs,
    ) -> torch.Tensor:
        B, T = clean.shape[:2]
        sigma, loss_mask = sample_training_noise(B, T, generator, self.cfg, device=clean.device)
        noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        # sigma = 0 leaves prefix frames exactly clean.
        s = sigma.to(clean.dtype).view(B, T, *([1] * (clean.dim() - 2)))  # (B, T, 1, 1, 1)
        x_noisy = clean + s * noise  # (B, T, C, h, w)
        denoised = precond(x_noisy, sigma, *net_args, **net_kwargs)
        return masked_denoising_loss(denoised, clean, sigma, loss_mask, precond.sigma_data)
