"""EDM preconditioning with one noise level per frame.

Karras, Aittala, Aila, Laine, "Elucidating the Design Space of Diffusion-Based Generative Models"
(NeurIPS 2022, arXiv 2206.00364), Table 1, applied per frame as diffusion forcing needs (Chen et
al. 2024, arXiv 2407.01392): a window of T latent frames carries T noise levels sigma (B, T).

Why EDM rather than flow matching: the world model is sampled with very few steps per frame (<= 4
network calls, on a CPU), autoregressively for thousands of frames. DIAMOND (Alonso et al. 2024,
arXiv 2405.12399), the closest prior diffusion world model, reports that the EDM parameterisation
stays stable over long rollouts with 1-3 denoising steps where noise prediction drifts: c_skip and
c_out make the network predict the clean frame at high noise (where the first few-step jump
lands) and a small correction at low noise, each with a unit-variance target. EDM also says
"clean" with sigma = 0 exactly (c_skip = 1, c_out = 0), which is how the past frames in the
streaming cache are conditioned, and its sampler (Karras sigmas + Euler / Heun) is a well studied
few-step ODE solver. A rectified-flow parameterisation would also work; it gives no advantage here.

Clean frames (sigma = 0) are context, not a prediction: `EDMPrecond` returns them bit-for-bit and
feeds the network a finite noise embedding for them (c_noise of `sigma_floor`, well below the
sampler's and the training distribution's sigmas, so the network can recognise "context").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EDMConfig:
    sigma_data: float = 1.0
    """Std of the data; latents are normalised to ~unit std, hence 1."""
    sigma_floor: float = 1e-3
    """c_noise for sigma below this uses this value (sigma = 0 would give ln 0 = -inf)."""


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """c_skip, c_out, c_in for any sigma shape (EDM Table 1). All finite at sigma = 0."""
    var = sigma.square() + sigma_data**2
    c_skip = sigma_data**2 / var
    c_out = sigma * sigma_data / var.sqrt()
    c_in = var.rsqrt()
    return c_skip, c_out, c_in


def edm_noise_embedding(sigma: torch.Tensor, sigma_floor: float) -> torch.Tensor:
    """c_noise = ln(sigma) / 4, with sigma clamped to sigma_floor so clean frames get a finite value."""
    return sigma.clamp_min(sigma_floor).log() / 4


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = 1 / c_out^2 (EDM eq. 8 choice): the network's effective target has unit
    variance at every sigma. Infinite at sigma = 0, where a frame is context and never in the loss;
    callers mask those frames out (`masked_denoising_loss` does it without inf * 0 = NaN)."""
    return (sigma.square() + sigma_data**2) / (sigma * sigma_data).square()


class EDMPrecond(nn.Module):
    """Preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), per frame.

    `net(x_in (B, T, C, h, w), c_noise (B, T), *args, **kwargs) -> (B, T, C, h, w)` is the raw
    network (actions and any streaming cache go through *args / **kwargs untouched).
    """

    def __init__(self, net: nn.Module, cfg: EDMConfig = EDMConfig()):
        super().__init__()
        self.net = net
        self.cfg = cfg

    @property
    def sigma_data(self) -> float:
        return self.cfg.sigma_data

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return edm_loss_weight(sigma, self.cfg.sigma_data)

    def forward(self, x_noisy: torch.Tensor, sigma: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x_noisy.dim() != 5 or sigma.shape != x_noisy.shape[:2]:
            raise ValueError(
                f"EDMPrecond wants x_noisy (B, T, C, h, w) and sigma (B, T); got x_noisy "
                f"{tuple(x_noisy.shape)} and sigma {tuple(sigma.shape)}"
            )
        # Coefficients in at least float32 (a bf16 sigma would round c_skip near 1).
        dtype = torch.promote_types(x_noisy.dtype, torch.float32)
        sigma = sigma.to(dtype)
        s = sigma[:, :, None, None, None]  # (B, T, 1, 1, 1), broadcasts over (C, h, w)
        c_skip, c_out, c_in = edm_coefficients(s, self.cfg.sigma_data)
        c_noise = edm_noise_embedding(sigma, self.cfg.sigma_floor)  # (B, T)

        x = x_noisy.to(dtype)
        f = self.net(x * c_in, c_noise, *args, **kwargs).to(dtype)  # (B, T, C, h, w)
        denoised = c_skip * x + c_out * f
        # c_skip = 1 and c_out = 0 at sigma = 0 already; `where` also makes it exact when the
        # network output is not finite for context frames (0 * inf would poison them).
        return torch.where(s == 0, x, denoised).to(x_noisy.dtype)
