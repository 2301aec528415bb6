"""Training windows whose recent past is the model's own open-loop dream (`ForcingConfig.rollout_context`).

Why. In a dream every frame after the real context is one the model drew itself, and it reaches
later frames by two routes: the backbone's cache and the direct path. Trained on real frames only,
the model trusts both, so its errors compound (`worldsim eval prediction --pathways`). Two earlier
remedies showed one route the model's errors and left the other real: Gaussian noise on the direct
path (`direct_noise`) and one-step predictions (`own_context`, whose backbone still read mostly
noised real frames). Each time the error moved to the other route.

What. In a window drawn for it, the real frames 0 .. s-1 (s = T // 2) are followed by K frames
(1 <= K <= `rollout_frames`, drawn per window) that the model dreams itself, open loop, from those
real frames with the window's actions: the simulator's own sampler (`rollout.session`), each frame
committed to a streaming cache as the dream env commits it. Frames 0 .. s + K - 1 form the clean
prefix (no loss; both routes read the dreamed frames, clean, exactly as at inference), and the real
frames s + K .. T - 1 are noised and in the loss as usual. So the first loss frame is predicted as a
dream predicts its next frame after K steps of its own, and its target is the real frame: the
model learns to pull a drifting dream back towards what the actions lead to.

The dream runs under no_grad on the bare model (through neither DDP nor torch.compile), so it adds
K steps of the simulator's per-frame work to a training step for the windows drawn, and nothing to
the backward pass. Its noise comes from generators seeded from the step's generator: a resumed
run draws the same dreams.
"""

from __future__ import annotations

import torch

from worldsim.diffusion.forcing import ForcingConfig
from worldsim.diffusion.sampler import sample_next_frames
from worldsim.model.world_model import WorldModel
from worldsim.rollout.session import DREAM_STEPS, dream_sampler


def check_rollout_context(probability: float, frames: int, own_context: float = 0.0) -> None:
    """Clear errors for settings `with_dreamed_context` cannot use."""
    if not 0 <= probability <= 1:
        raise ValueError(f"rollout_context must be a probability in [0, 1], got {probability}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"rollout_frames must be an integer >= 1, got {frames!r}")
    if probability > 0 and own_context > 0:
        raise ValueError("rollout_context and own_context both replace a window's context: use one of them")


@torch.no_grad()
def dream_continuation(model: WorldModel, latents: torch.Tensor, cond_actions: torch.Tensor, start: int,
                       frames: int, generator: torch.Generator | None) -> torch.Tensor:
    """The dream's frames start .. start + frames - 1 of each window, from its real frames before
    `start`: (B, frames, C, h, w) in the latents' dtype.

    latents (B, T, C, h, w) clean; cond_actions (B, T[, D]) as the model conditions frame i (the
    action that led to it; frame 0's is "no action", so start >= 1)."""
    B, T = latents.shape[:2]
    if not (1 <= start and start + frames <= T):
        raise ValueError(f"a dream from frame {start} for {frames} frames does not fit a window of {T}")
    model = getattr(model, "bare", model)  # a `TrainView`: stream the bare model, eagerly
    device = latents.device
    cache = model.allocate_cache(B, device=device)
    no_action = torch.zeros(B, start, dtype=torch.bool, device=device)
    no_action[:, 0] = True
    prefix = latents[:, :start]
    model(prefix, prefix.new_zeros(B, start, dtype=torch.float32), cond_actions[:, :start], cache=cache, no_action=no_action)
    seeds = torch.randint(0, 2**62, (B,), generator=generator, device=generator.device if generator is not None else "cpu")
    streams = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds.tolist()]
    shape = (B, *latents.shape[2:])
    dreamed = []
    for t in range(start, start + frames):
        frame = model.begin_frame(cache, cond_actions[:, t], actions_checked=True)
        x = sample_next_frames(frame.denoise, shape, streams, DREAM_STEPS, device=device, **dream_sampler(DREAM_STEPS))
        frame.commit(x)
        dreamed.append(x.to(latents.dtype))
    return torch.stack(dreamed, dim=1)


def with_dreamed_context(model: WorldModel, latents: torch.Tensor, cond_actions: torch.Tensor, sigma: torch.Tensor,
                         loss_mask: torch.Tensor, generator: torch.Generator | None,
                         cfg: ForcingConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewrite a batch's noise plan and context for the windows drawn for a dreamed past (module doc).

    sigma, loss_mask (B, T) from `sample_training_noise`. Returns (sigma, loss_mask, context,
    dreamed): context (B, T, C, h, w) is what later frames see of each frame (the real latents,
    the dream in place of frames s .. s + K - 1 where drawn), dreamed (B, T) bool marks those
    frames (their rewards are not the data's: the heads skip them)."""
    check_rollout_context(cfg.rollout_context, cfg.rollout_frames, cfg.own_context)
    B, T = latents.shape[:2]
    device = latents.device
    start = T // 2
    longest = min(cfg.rollout_frames, T - 1 - start)  # at least one loss frame after the dream
    if longest < 1:
        raise ValueError(f"rollout_context needs windows of at least 4 frames, got T={T}")
    # Drawn for every window, used or not: the random stream depends on (seed, B, T) only.
    drawn = torch.rand(B, generator=generator, device=device) < cfg.rollout_context  # (B,)
    depth = torch.randint(1, longest + 1, (B,), generator=generator, device=device)  # (B,)
    fresh = (torch.randn(B, T, generator=generator, device=device) * cfg.p_std + cfg.p_mean).exp()  # (B, T)
    context = latents
    dreamed = torch.zeros(B, T, dtype=torch.bool, device=device)
    rows = drawn.nonzero().flatten()
    if len(rows):
        dream = dream_continuation(model, latents[rows], cond_actions[rows], start, int(depth[rows].max()), generator)
        frame = torch.arange(T, device=device)
        ends = (start + depth)[:, None]  # (B, 1): the first loss frame
        prefix = drawn[:, None] & (frame[None] < ends)  # (B, T)
        dreamed = drawn[:, None] & (frame[None] >= start) & (frame[None] < ends)
        sigma = torch.where(drawn[:, None], torch.where(prefix, torch.zeros_like(sigma), fresh), sigma)
        loss_mask = torch.where(drawn[:, None], ~prefix, loss_mask)
        context = latents.clone()
        padded = latents[rows].clone()
        padded[:, start : start + dream.shape[1]] = dream
        context[rows] = torch.where(dreamed[rows][:, :, None, None, None], padded, latents[rows])
    return sigma, loss_mask, context, dreamed
