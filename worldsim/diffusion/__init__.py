"""Diffusion for the world model: EDM preconditioning, diffusion-forcing training noise, few-step sampler.

- `edm`: `EDMConfig`, `EDMPrecond` (wraps the raw denoiser network; per-frame noise levels).
- `forcing`: `ForcingConfig`, `sample_training_noise` (independent per-frame sigmas plus the
  long-context clean prefix), `masked_denoising_loss` and the `DiffusionForcingLoss` callable.
- `sampler`: `karras_sigmas`, `sample_next_frame` / `sample_next_frames` (one new frame given the
  cached past, a few Euler or Heun steps).

Deliberately no imports here: importing one module does not pull in the others.
"""
