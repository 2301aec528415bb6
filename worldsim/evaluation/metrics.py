"""Per-frame image scores of uint8 frames (N, H, W, C): PSNR and SSIM against reference frames, and
sharpness (mean squared luminance gradient), which needs none.

SSIM is the standard one of Wang et al. 2004 ("Image quality assessment: from error visibility to
structural similarity"): local means, variances and covariance under an 11 x 11 Gaussian window
(sigma 1.5), K1 = 0.01, K2 = 0.03, dynamic range L = 255, computed per channel over the "valid"
positions (no padding, so borders are not scored against made-up pixels) and averaged over
positions and channels. This is what video-prediction papers (and the paper's Memory Maze table)
report; it matches `skimage.metrics.structural_similarity(..., gaussian_weights=True,
use_sample_covariance=False, data_range=255, channel_axis=-1)` up to the border handling.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from worldsim.codec.autoencoder import psnr as codec_psnr


SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0
LUMA = (0.299, 0.587, 0.114)
MAZE_BORDER = 4
"""Pixels a sharpness score leaves out at each edge: Memory Maze draws the target colour there as a
flat frame, which no model gets wrong."""


def psnr(reference: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR (dB, capped at 100) of uint8 (N, H, W, C) frames -> (N,) float64."""

    _check_pair(reference, prediction)
    return codec_psnr(reference, prediction).double()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()  # (size,)


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable valid Gaussian filter of (N, C, H, W) per channel -> (N, C, H - k + 1, W - k + 1)."""
    c, k = x.shape[1], len(g)
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)  # along H
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)  # along W


def ssim(reference: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """Per-frame SSIM of uint8 (N, H, W, C) frames -> (N,) float64 in [-1, 1]; 1 iff equal."""
    _check_pair(reference, prediction)
    if min(reference.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(reference.shape[1:3])}")
    x = reference.permute(0, 3, 1, 2).double()  # (N, C, H, W); float64: var = E[x^2] - E[x]^2 cancels badly in float32
    y = prediction.permute(0, 3, 1, 2).double()
    g = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA).to(x.device)
    mu_x, mu_y = _blur(x, g), _blur(y, g)
    var_x = _blur(x * x, g) - mu_x**2
    var_y = _blur(y * y, g) - mu_y**2
    cov = _blur(x * y, g) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1).cpu()  # (N,): mean over channels and positions


def _check_pair(reference: torch.Tensor, prediction: torch.Tensor) -> None:
    if reference.dtype != torch.uint8 or prediction.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8, got {reference.dtype} and {prediction.dtype}")
    if reference.shape != prediction.shape or reference.ndim != 4:
        raise ValueError(f"need two (N, H, W, C) batches of one shape, got {tuple(reference.shape)} "
                         f"and {tuple(prediction.shape)}")


def sharpness(frames: torch.Tensor | np.ndarray, border: int = MAZE_BORDER) -> torch.Tensor:
    """Mean squared luminance gradient of uint8 frames (N, H, W, 3) inside `border` -> (N,) float64.

    Luminance in [0, 1]; horizontal and vertical forward differences, each squared and averaged
    over the interior, then summed.
    """
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"sharpness takes uint8 frames (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    if border < 0 or 2 * border + 2 > min(x.shape[1:3]):
        raise ValueError(f"border {border} leaves no interior in {tuple(x.shape[1:3])} frames")
    y = (x.double() / 255.0) @ torch.tensor(LUMA, dtype=torch.float64)  # (N, H, W)
    if border:
        y = y[:, border:-border, border:-border]
    gx = (y[:, :, 1:] - y[:, :, :-1]).square().flatten(1).mean(1)
    gy = (y[:, 1:, :] - y[:, :-1, :]).square().flatten(1).mean(1)
    return gx + gy
