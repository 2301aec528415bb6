"""The world-model training loss: diffusion forcing denoising + reward MSE + termination BCE.

Alignment. The loader (`worldsim.data.windows`) yields frames o_s .. o_{s+T-1} with actions
a_s .. a_{s+T-1} (a_t taken AT frame o_t), rewards r_t and terminations term_t of step t
(term_t: o_{t+1} is terminal). The model conditions frame i on the action that LED TO it, so:

    frame i of the window     conditioned on            heads predict
    0                         "no action" (learned)     nothing (not trained)
    i >= 1                    a_{s+i-1}                 r_{s+i-1}, term_{s+i-1}

The window's last action, reward and termination have no frame in the window and are unused.

Where the heads are trained. At inference the reward and termination of a transition are read
off the call that commits the new clean frame (sigma = 0) with every earlier frame clean too
(`WorldModel.step(clean, 0, ...)`). In a diffusion-forcing batch exactly those conditions hold on
the long-context clean prefix (sigma = 0 for frames 0..L-1, all earlier frames clean), so the
heads are trained there and only there: it matches inference exactly and costs nothing extra,
whereas heads trained on noisy frames would learn from inputs they never see at inference (and a
separate clean pass would double the cost of a step). With the default p = 0.5 and prefixes of
more than T/2 frames, ~37% of frames train the heads. The price: `forcing_cfg.p_long_context`
must be > 0 (checked).

Reward loss: plain MSE. The rewards of our sources are small and bounded (Memory Maze: 0 or +1
per step), where MSE regresses the expected reward the dream env should return; DreamerV3's
symlog two-hot is for rewards spanning orders of magnitude, which we do not have.
Termination: binary cross-entropy on the logit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worldsim.diffusion.edm import edm_coefficients
from worldsim.diffusion.forcing import ForcingConfig, masked_denoising_loss, sample_training_noise
from worldsim.model.conditioning import shift_actions
from worldsim.model.world_model import WorldModel


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values over mask (0 with zero gradient when the mask is empty, never NaN)."""
    values = torch.where(mask, values, torch.zeros_like(values))
    return values.sum() / mask.sum().clamp_min(1)


def _augment_direct(latents: torch.Tensor, max_std: float, generator: torch.Generator | None) -> torch.Tensor:
    """The direct path's clean latents with per-frame Gaussian noise of std ~ U(0, max_std).

    Why: in a dream the direct path is shown the model's own previous frames, and with the
    bundled model that is where open-loop error compounds (shown the real previous frames instead,
    with the backbone still fed its own, the open-loop mean over 32 frames rose from 17.3 to 25.6
    dB on held-out windows; the other way round, 21.0). Trained only on real frames, the path
    trusts what it is shown; noise teaches it to check that against the backbone's context.
    """
    if max_std <= 0:
        return latents
    B, T = latents.shape[:2]
    std = torch.rand(B, T, generator=generator, device=latents.device) * max_std  # (B, T)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return latents + std.to(latents.dtype)[:, :, None, None, None] * noise


def _noised_after_prefix(context: torch.Tensor, x_noisy: torch.Tensor, sigma: torch.Tensor, p: float,
                         sigma_data: float, generator: torch.Generator | None) -> torch.Tensor:
    """`context` with the noised frames of a fraction p of the windows that have a clean prefix
    replaced, for the direct path, by their noised latents scaled back to the clean latents'
    variance (sigma_data x the denoiser's c_in, so sigma -> 0 gives the clean frame): a frame after
    the prefix then knows its near past only through noise and the far past, beyond the attention
    window, only through the state (`ForcingConfig.noised_direct`)."""
    B = context.shape[0]
    picked = (torch.rand(B, generator=generator, device=context.device) < p) & (sigma[:, 0] == 0)  # (B,)
    c_in = edm_coefficients(sigma, sigma_data)[2]  # (B, T)
    noised = x_noisy * (sigma_data * c_in).to(context.dtype)[:, :, None, None, None]
    replace = picked[:, None] & (sigma > 0)  # (B, T): the frames after a picked window's prefix
    return torch.where(replace[:, :, None, None, None], noised, context)


# The dream's two-call sampler, as `own_context` imitates it (`rollout.session.DREAM_SAMPLER`,
# `DREAM_SAMPLERS[2]`): its calls are at sigma 20 and 2.3, each raised by churn (at most
# sqrt(2) - 1, so to about 28 and 3.3), and its result extrapolates the second estimate from the
# first by 0.85. Here 20 (a frame at 20 is already almost pure noise) and 3, close to the second.
OWN_SIGMAS = (20.0, 3.0)
OWN_EXTRAPOLATION = 0.85
OWN_REAL_FRAMES = 2
"""The first frames of a window stay real in an own-context window: a dream starts from real context,
and frame 0's prediction has no action and no past to come from."""


@torch.no_grad()
def own_predictions(model: WorldModel, latents: torch.Tensor, cond_actions: torch.Tensor, no_action: torch.Tensor,
                    generator: torch.Generator | None) -> torch.Tensor:
    """(B, T, C, h, w) each frame as the dream's sampler would draw it from the real frames before it.

    Two batched passes over the window, as the sampler's two calls: every frame at sigma 20, then
    every frame at 3 from the first estimate plus fresh noise; the result extrapolates the second
    estimate from the first as the sampler does. Each frame's direct path sees the real frames
    before it, so every prediction is one step from real context (scheduled sampling at depth
    one): the errors it carries are the model's own, which no Gaussian noise imitates.
    """
    direct = {"clean": latents} if model.cfg.prev_frames else {}
    B, T = latents.shape[:2]
    estimates = []
    x = latents
    for level in OWN_SIGMAS:
        sigma = latents.new_full((B, T), level, dtype=torch.float32)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        x = x + level * noise
        estimates.append(model(x, sigma, cond_actions, no_action=no_action, **direct).denoised.to(latents.dtype))
        x = estimates[-1]
    first, last = estimates
    return last + OWN_EXTRAPOLATION * (last - first)


def world_model_loss(
    model: WorldModel,
    latents: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    terminations: torch.Tensor,
    generator: torch.Generator | None = None,
    forcing_cfg: ForcingConfig | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One training loss on a batch of windows, data-aligned as the loader yields them.

    latents (B, T, C, h, w) clean (normalised) latents; actions (B, T) int | (B, T, D) float;
    rewards (B, T) float; terminations (B, T) bool. Returns (loss, stats) with stats "loss",
    "denoise", "reward", "termination" (floats) and "head_frames" (frames that trained the heads).
    """
    cfg = model.cfg
    forcing_cfg = ForcingConfig() if forcing_cfg is None else forcing_cfg
    if latents.dim() != 5:
        raise ValueError(f"latents must be (B, T, C, h, w), got {tuple(latents.shape)}")
    B, T = latents.shape[:2]
    if T < 2:
        raise ValueError(f"windows need T >= 2 frames (frame 0 has no action), got T={T}")
    if rewards.shape != (B, T) or terminations.shape != (B, T):
        raise ValueError(
            f"rewards and terminations must be (B, T) = {(B, T)}, got {tuple(rewards.shape)} and {tuple(terminations.shape)}"
        )
    if terminations.dtype != torch.bool:
        raise ValueError(f"terminations must be bool, got {terminations.dtype}")
    if forcing_cfg.p_long_context <= 0:
        raise ValueError("the reward / termination heads train on the clean prefix: p_long_context must be > 0")
    model.net.action_emb.check(actions, (B, T), None)  # before shifting, so errors name the data's shape

    cond_actions, no_action = shift_actions(actions, cfg)  # frame i <- a_{i-1}; frame 0: no action
    sigma, loss_mask = sample_training_noise(B, T, generator, forcing_cfg, device=latents.device)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    x_noisy = latents + sigma.to(latents.dtype)[:, :, None, None, None] * noise  # (B, T, C, h, w)
    context = latents  # what later frames see of each frame: the direct path and the clean prefix
    if forcing_cfg.own_context > 0:
        own = torch.rand(B, generator=generator, device=latents.device) < forcing_cfg.own_context  # (B,)
        predicted = own_predictions(model, latents, cond_actions, no_action, generator)
        predicted[:, :OWN_REAL_FRAMES] = latents[:, :OWN_REAL_FRAMES]
        context = torch.where(own[:, None, None, None, None], predicted, latents)
        # Only the clean prefix (sigma = 0, out of the loss) is pure context in the backbone; the
        # noised frames are also the denoiser's inputs, whose target is the real frame.
        x_noisy = torch.where((sigma == 0)[:, :, None, None, None], context, x_noisy)
    if cfg.prev_frames and forcing_cfg.noised_direct > 0:
        context = _noised_after_prefix(context, x_noisy, sigma, forcing_cfg.noised_direct, model.sigma_data, generator)
    # The direct path (cfg.prev_frames) shows each frame the clean frames before it, as at inference.
    direct = {"clean": _augment_direct(context, forcing_cfg.direct_noise, generator)} if cfg.prev_frames else {}
    out = model(x_noisy, sigma, cond_actions, no_action=no_action, **direct)

    denoise = masked_denoising_loss(out.denoised, latents, sigma, loss_mask, model.sigma_data)

    # Heads at frame i >= 1 predict step i - 1's reward / termination, on clean-prefix frames only.
    head_mask = sigma[:, 1:] == 0  # (B, T - 1)
    reward_err = (out.reward[:, 1:].float() - rewards[:, :-1].float()).square()  # (B, T - 1)
    reward_loss = _masked_mean(reward_err, head_mask)
    term_bce = F.binary_cross_entropy_with_logits(
        out.termination_logit[:, 1:].float(), terminations[:, :-1].float(), reduction="none"
    )  # (B, T - 1)
    term_loss = _masked_mean(term_bce, head_mask)

    loss = denoise + cfg.reward_loss_weight * reward_loss + cfg.termination_loss_weight * term_loss
    stats = {
        "loss": loss.item(),
        "denoise": denoise.item(),
        "reward": reward_loss.item(),
        "termination": term_loss.item(),
        "head_frames": float(head_mask.sum().item()),
    }
    return loss, stats
