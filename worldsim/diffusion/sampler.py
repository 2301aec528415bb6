"""Few-step sampler for the next frame: Karras sigmas, then DPM-Solver++(2M), Euler or Heun steps.

The probability-flow ODE of EDM (Karras et al., "Elucidating the Design Space of Diffusion-Based
Generative Models", NeurIPS 2022, arXiv 2206.00364), dx/dsigma = (x - D(x; sigma)) / sigma,
integrated from sigma_max to 0 on the schedule sigma_i = (sigma_max^(1/rho) + i/(N-1)
(sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i < N, then sigma_N = 0.

Solvers (N = steps):
- "dpm2m" (default): DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095), second order by reusing
  the previous step's denoised estimate, so it costs N denoiser calls like Euler. At 4 calls it
  keeps the spread of the samples: with the exact denoiser of a Gaussian, 4 Euler steps shrink the
  sample std to ~55-70% of the truth (the few-step "blur"), 4 dpm2m steps stay within a few %
  (tests/test_diffusion.py checks this).
- "euler": EDM Algorithm 1 without the correction (= DDIM); N calls.
- "heun": EDM Algorithm 1/2; 2N - 1 calls. Good with many steps, poor at <= 4 calls.
Optional "final_extrapolation" w: the output is D_N + w (D_N - D_{N-1}), the last estimate pushed
further along its change since the previous step's (DPM-Solver++(2M)'s linear extrapolation of D,
which cannot be taken to sigma = 0 itself). With 2 calls and sigma_min near 2 it gives the detail
that a third call at a low sigma gave (`rollout.session.DREAM_SAMPLERS` has the measurements);
0 (default): plain D_N.
Optional "churn" (EDM Algorithm 2) adds fresh noise before each step, drawn from the same
generator (a seeded stream still repeats); it is off by default here, the few steps going to the
ODE. World-model dreams turn it on (`rollout.session.DREAM_SAMPLER` says why).

World-model use: the streaming code owns the model and the cached past. It passes a closure
`denoise_fn(x_noisy (B, C, h, w), sigma (B,)) -> x_denoised (B, C, h, w)` that runs the model on
the new frame at noise level sigma with the past frames at sigma = 0. The sampler knows nothing
about the model, the cache or the actions.

Defaults: 4 dpm2m steps (4 calls per frame), sigma_max 5, sigma_min 0.1, rho 7. These are generic;
world-model dreams start higher (`rollout.session.DREAM_SAMPLER`, sigma_max 20: a start at 5 lacks
the data's own variance and the network reads noise as signal). sigma_min: the last call, D(x; sigma_min), IS the output, so with 4 calls
it must still do real work. At EDM's 0.002 (tuned for ~35 calls) a learned denoiser barely moves
x there and cannot correct the previous steps: on the 2-point toy of the tests, 5% of 4-step
dpm2m samples land within 0.1 of a point at 0.002, 90% at 0.1. The price: a mode narrower than
~sigma_min is returned near its mean (exact-denoiser Gaussians of std 0.1 / 0.5 / 1 come out with
62% / 93% / 99% of their std). Tune per model; the sampler takes both as arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SIGMA_MIN = 0.1
"""Default last noise level before the final jump to sigma = 0 (module doc)."""
SIGMA_MAX = 5.0
"""Default starting noise level (module doc)."""
RHO = 7.0
"""Default Karras schedule curvature."""
Solver = Literal["dpm2m", "euler", "heun"]
SOLVERS = ("dpm2m", "euler", "heun")


def karras_sigmas(
    steps: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(steps + 1,) float64 decreasing noise levels: sigma_max, ..., sigma_min, 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if steps == 1:  # one jump from sigma_max straight to the clean estimate
        ramp = torch.zeros(1, dtype=torch.float64, device=device)
    else:
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas[0] = sigma_max  # exact endpoints (the power round-trip is off by an ulp)
    if steps > 1:
        sigmas[-1] = sigma_min
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def num_denoiser_calls(steps: int, solver: Solver = "dpm2m") -> int:
    """Network evaluations per generated frame."""
    return 2 * steps - 1 if solver == "heun" else steps


def _solve(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    solver: Solver,
    churn: float,
    churn_range: tuple[float, float],
    churn_noise: float,
    noise_like: Callable[[torch.Tensor], torch.Tensor],
    final_extrapolation: float = 0.0,
) -> torch.Tensor:
    """Integrate from x at sigmas[0] to sigma = 0; returns the final clean estimate. x (B, ...)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not final_extrapolation >= 0:
        raise ValueError(f"final_extrapolation must be >= 0, got {final_extrapolation}")
    B = x.shape[0]
    steps = len(sigmas) - 1
    # EDM caps the added noise at sqrt(2) - 1 of sigma per step so churn cannot undo the progress.
    gamma = min(churn / steps, math.sqrt(2) - 1)
    prev_denoised, prev_h = None, None  # the previous step's estimate (dpm2m, final_extrapolation) and length
    for i in range(steps):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        if churn > 0 and churn_range[0] <= sigma <= churn_range[1]:
            sigma_hat = sigma * (1 + gamma)
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * churn_noise * noise_like(x)
            sigma = sigma_hat
        denoised = denoise_fn(x, x.new_full((B,), sigma))
        if sigma_next == 0:
            # Every solver's last step: the ODE's Euler step to sigma = 0 is exactly D(x; sigma).
            x = denoised
            if final_extrapolation and prev_denoised is not None:
                # Second order in spirit (DPM-Solver++(2M)'s D extrapolated from two estimates):
                # push the last estimate further along the change since the previous one.
                x = denoised + final_extrapolation * (denoised - prev_denoised)
        elif solver == "dpm2m":
            # Exponential integrator in lambda = -ln(sigma), with D extrapolated linearly in lambda
            # from this step's and the previous step's estimates (first order on the first step).
            h = math.log(sigma / sigma_next)
            d_eff = denoised
            if prev_denoised is not None:
                r = prev_h / h
                d_eff = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * prev_denoised
            x = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * d_eff
            prev_h = h
        else:
            d = (x - denoised) / sigma  # dx/dsigma at sigma
            x_next = x + (sigma_next - sigma) * d
            if solver == "heun":
                # Trapezoidal correction with the slope at the end of the step.
                d_next = (x_next - denoise_fn(x_next, x.new_full((B,), sigma_next))) / sigma_next
                x_next = x + (sigma_next - sigma) * (d + d_next) / 2
            x = x_next
        prev_denoised = denoised
    return x


def sample_next_frame(
    denoise_fn: DenoiseFn,
    shape: Sequence[int],
    steps: int = 4,
    generator: torch.Generator | None = None,
    *,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    solver: Solver = "dpm2m",
    churn: float = 0.0,
    churn_range: tuple[float, float] = (0.0, float("inf")),
    churn_noise: float = 1.0,
    final_extrapolation: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Generate one new frame for a batch of B streams, all noise drawn from one generator.

    shape is (B, C, h, w) (B = 1 for a single stream); denoise_fn gets x (B, C, h, w) and sigma
    (B,). Returns the clean frame (B, C, h, w). With churn = 0 the only randomness is the initial
    noise, so a seeded generator gives the same frame every time.
    """
    if device is None:
        device = generator.device if generator is not None else "cpu"
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)

    def noise_like(x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    x = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device) * sigma_max
    return _solve(denoise_fn, x, sigmas, solver, churn, churn_range, churn_noise, noise_like, final_extrapolation)


def sample_next_frames(
    denoise_fn: DenoiseFn,
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    steps: int = 4,
    *,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    solver: Solver = "dpm2m",
    churn: float = 0.0,
    churn_range: tuple[float, float] = (0.0, float("inf")),
    churn_noise: float = 1.0,
    final_extrapolation: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Batched version for B independent streams (vector envs, planners): one generator per stream.

    Row b's noise comes only from generators[b], so a stream's frames do not depend on which other
    streams share the batch: a forked planner rollout with the same generator state reproduces
    the single-stream rollout (given a denoiser that treats rows independently).
    shape is (B, C, h, w) with B == len(generators). Returns (B, C, h, w).
    """
    B = shape[0]
    if len(generators) != B:
        raise ValueError(f"need one generator per stream: shape has B={B}, got {len(generators)}")
    if device is None:
        device = generators[0].device if B > 0 else "cpu"
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)

    def noise_like(x: torch.Tensor) -> torch.Tensor:
        rows = [torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device) for g in generators]
        return torch.stack(rows)  # (B, C, h, w)

    x = noise_like(torch.empty(tuple(shape), dtype=dtype, device=device)) * sigma_max
    return _solve(denoise_fn, x, sigmas, solver, churn, churn_range, churn_noise, noise_like, final_extrapolation)
