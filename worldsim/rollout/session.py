"""A batch of dream streams: the world model's streaming state plus one noise generator per stream.

`RolloutSession` owns a `WorldModelCache` (per-layer SSM block states, conv states and the local
attention KV ring) for B streams and runs the dream loop of `worldsim.model.world_model`:

    reset(context frames, context actions)   encode with the codec, prefill the cache in one
                                              parallel forward at sigma = 0
    step(actions, decode=True)                sample the next latent in `sampler_steps` denoiser
                                              calls that read the cache without advancing it,
                                              commit the clean latent (which also yields the
                                              reward and termination of that transition), decode
                                              it to pixels (decode=False skips that: planners)
    observe(actions, frames | latents)        teacher forcing: sample the next frame as step does
                                              (the prediction is returned), then commit the REAL
                                              next frame instead (evaluation, MPC on a real env)
    extend(frames, actions)                   commit more real frames in one parallel forward
                                              (long contexts in chunks: the same state as one
                                              prefill of them all)
    commit(actions, latents)                  commit given latents, no sampling (benchmarks)
    show_direct_path(latents)                 what the direct path shows of the last frame (diagnostics)
    fork(n) / select(indices)                 new sessions over copied streams (planners)
    reset_streams(indices, ...)               re-seed some streams only (vector-env auto-reset)

Action convention: context_actions[:, t] is the action taken at context frame t, which led to
frame t + 1, so a context of T0 frames comes with T0 - 1 actions (the first frame has none and is
conditioned on the model's "no action").

Reproducibility: stream b draws its noise only from its own generator (`sample_next_frames`), so
a stream's frames do not depend on the other streams in the batch, and a forked stream whose
generator state was copied reproduces its parent's future exactly.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from worldsim.codec.autoencoder import FrameCodec
from worldsim.diffusion.sampler import sample_next_frames
from worldsim.model.world_model import WorldModel, WorldModelCache, WorldModelOutput
from worldsim.utils import cpu


@dataclass
class StepResult:
    frames: torch.Tensor | None
    """(B, H, W, 3) uint8, the decoded new frames (CPU); None from `step(..., decode=False)`."""
    rewards: torch.Tensor
    """(B,) float32, predicted reward of the transition into each new frame (CPU)."""
    terminated: torch.Tensor
    """(B,) bool, termination logit > 0 (CPU)."""
    termination_logits: torch.Tensor
    """(B,) float32 (CPU)."""
    latents: torch.Tensor
    """(B, C, h, w) the committed clean latents (model device)."""


DREAM_STEPS = 2
"""Denoiser calls per dreamed frame unless a caller asks for another number. The configs, envs and
commands that take `sampler_steps` write this value as their literal default (a test holds them to it).
Two calls with the settings of `DREAM_SAMPLERS[2]` dream what three calls did, a call cheaper."""

DREAM_SAMPLER = {"sigma_max": 20.0, "churn": 1.0}
"""Sampler settings of every dream unless a caller passes its own (`sampler_kwargs` add to and
override these; the rest are `diffusion.sampler`'s defaults: dpm2m down to sigma_min 0.1).

Why sigma_max 20 and not the sampler's generic 5: the sampler starts from pure noise,
x = sigma_max * n, while a training input at that level is x0 + sigma_max * n, which also carries
the data's own variance (latents have unit std). At 5 that part is 4% of the variance, enough for
the network to read noise as signal. Measured on 40 held-out Memory Maze windows with the model
bundled before this change: the one-call prediction from 5 had a latent MSE of 0.164 (copying the
last frame: 0.247), from 20 0.118; four dpm2m calls from 5 gave 0.262, from 20 0.185 and frames
with about twice the image-gradient energy. Much higher levels (80), rarely seen in training, do
worse again.

Why churn 1 (EDM's stochastic sampler: before each step, fresh noise raises sigma by a third,
drawn from the stream's own generator, so a seeded stream still repeats) and 3 calls: the
denoiser of a small model errs, and a deterministic few-step ODE carries each call's error into
the next; re-noising lets the next call correct it. Measured with the bundled model on the
held-out Memory Maze episodes (`worldsim eval prediction ... --horizon 32 --seed 1`, 40 windows;
`worldsim eval realism`, seeds 0 and 1, 8 dreams x 1,000 frames each): 1-step PSNR dB, open-loop
mean PSNR dB over 32 frames, Fréchet distance to real frames at dream frames 500-1000 (seed 0, 1):
4 calls, no churn (before): 24.20, 16.84, 22.0 and 23.4; 4 calls, churn 1: 24.96, 16.95, 15.8
and 15.7; 3 calls, churn 1: 25.46, 17.25, 21.2 and 20.6, with a frame a fifth cheaper. 2 calls
(sigma_min 0.3) score 26.03 and 17.77 but return the model's blurred mean (Fréchet 57); 2 calls
with the settings of DREAM_SAMPLERS[2] do what 3 did (the dream's default since)."""


DREAM_SAMPLERS = {2: {"sigma_min": 2.3, "final_extrapolation": 0.85}}
"""Settings over DREAM_SAMPLER for a number of denoiser calls (`dream_sampler`).

2 calls: the three-call sampler (sigmas 20, 2.31, 0.1 with churn) did its work in its first two
calls; its third, at sigma 0.13, barely moves a frame that is already clean to within 0.1. Its
detail came from the second step's DPM-Solver++(2M) update, which extrapolates D from the two
estimates with weight 1 / (2r) = 0.69 (r = the ratio of the steps' log-sigma lengths, 2.5 / 3.5).
So two calls at 20 and 2.3 return D2 + w (D2 - D1) (`diffusion.sampler`'s final_extrapolation)
and skip the third. Measured with the bundled model like DREAM_SAMPLER's rows: 1-step, open loop
t=16 and open-loop mean /32 in dB (40 windows, seed 1); sharpness vs real and Fréchet distance at
dream frames 500-1000, the mean of seeds 0 and 1:
    three calls (before)            26.68  16.28  17.28   0.245  20.5
    two calls, w = 0                27.40  17.04  17.98   0.22   26.6 (seed 0)
    two calls, w = 0.5              26.96  16.64  17.65   0.23   22.0
    two calls, w = 0.7              26.74  16.34  17.45   0.25   21.0
    two calls, w = 0.85 (these)     26.56  16.11  17.31   0.26   19.5
    two calls, w = 1.0              26.38  15.84  17.14   0.285  18.7
w trades PSNR, which rewards blur, for sharper long dreams nearer real frames; 0.85 keeps within
0.2 dB of the three calls. sigma_min 1.5 or 3.5 (w = 0.7) gave 26.51 and 27.01 at one step and
no better dreams (distances 22.9 and 22.5, seed 0)."""


def dream_sampler(steps: int) -> dict:
    """The dream's sampler settings for `steps` denoiser calls per frame."""
    return {**DREAM_SAMPLER, **DREAM_SAMPLERS.get(steps, {})}


FOLD_COMMIT = False
"""Default of `RolloutSession(fold_commit=...)`: commit each dreamed frame with the sampler's last
denoiser call (at sigma_min) instead of an extra call on the clean result."""


_DECODER: ThreadPoolExecutor | None = None


def _decode_thread() -> ThreadPoolExecutor:
    """The one worker thread every session decodes on while its main thread commits."""
    global _DECODER
    if _DECODER is None:
        _DECODER = ThreadPoolExecutor(1, thread_name_prefix="worldsim-decode")
    return _DECODER


def _forget_decode_thread() -> None:
    global _DECODER
    _DECODER = None  # a forked child has none of its parent's threads: it starts its own


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_decode_thread)


OVERLAP_MIN_BATCH = 8
"""Smallest batch whose decode runs beside the commit by default (`RolloutSession.overlap_decode`)."""


def overlap_pays(device: torch.device, batch: int) -> bool:
    """Whether decoding on a second thread beside the commit is worth it by default: a CPU session
    of at least OVERLAP_MIN_BATCH streams whose torch threads leave a core free."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return device.type == "cpu" and batch >= OVERLAP_MIN_BATCH and torch.get_num_threads() < cores


BF16_MODEL_MIN_BATCH = 16
"""Smallest batch whose world model runs in bfloat16 by default in the batched dream env
(`bf16_model_pays`)."""


def bf16_model_pays(device: torch.device | str, batch: int) -> bool:
    """Whether running the world model in bfloat16 (`RolloutSession(model_bf16=True)`) is the faster
    choice: on a CPU with AMX tiles, from BF16_MODEL_MIN_BATCH streams. The bundled model on one
    thread (Xeon with AMX), the time of a frame without decoding, bfloat16 over float32 (medians
    of paired steps): batch 1 1.21, batch 8 0.99, 16 0.85, 32 0.77, 64 0.72 (268 -> 196 ms).
    The matmuls run on the AMX tiles; the small ops that small batches spend their time in gain
    nothing. Without AMX, bfloat16 matmuls are emulated and slower."""
    return torch.device(device).type == "cpu" and batch >= BF16_MODEL_MIN_BATCH and cpu.has_amx()


MODEL_DTYPES = ("auto", "float32", "bfloat16")
"""Choices of the world model's dtype where a caller picks it (`worldsim bench rollout`, planners)."""


def model_in_bf16(choice: str, device: torch.device | str, batch: int) -> bool:
    """Whether a `MODEL_DTYPES` choice runs `batch` streams in bfloat16 ("auto": `bf16_model_pays`)."""
    return bf16_model_pays(device, batch) if choice == "auto" else choice == "bfloat16"


def bfloat16_copy(model: WorldModel) -> WorldModel:
    """A copy of `model` with bfloat16 weights (its streaming caches follow); `model` is unchanged."""
    return model if next(model.parameters()).dtype == torch.bfloat16 else copy.deepcopy(model).to(torch.bfloat16)


def _result(out: WorldModelOutput, latents: torch.Tensor) -> StepResult:
    """A committed frame's StepResult, frames not decoded: rewards and terminations on the CPU."""
    logits = out.termination_logit.float().cpu()
    return StepResult(frames=None, rewards=out.reward.float().cpu(), terminated=logits > 0,
                      termination_logits=logits, latents=latents)


def _copy_generator(g: torch.Generator) -> torch.Generator:
    out = torch.Generator(device=g.device)
    out.set_state(g.get_state())
    return out


class _PhaseClock:
    """Adds the seconds since the previous lap to timings[name]; does nothing without a dict.
    On a GPU it synchronises first, so a phase is charged for its own kernels."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device) -> None:
        self.timings, self.device = timings, device
        self.last = time.perf_counter() if timings is not None else 0.0

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


class RolloutSession:
    """B world-model streams (see the module doc). Inference only: everything runs under no_grad."""

    def __init__(
        self,
        model: WorldModel,
        codec: FrameCodec,
        *,
        batch: int,
        sampler_steps: int = DREAM_STEPS,
        seed: int | None = None,
        sampler_kwargs: dict | None = None,
        fold_commit: bool | None = None,
        decode_bf16: bool = False,
        overlap_decode: bool | None = None,
        model_bf16: bool = False,
    ) -> None:
        """model_bf16: run the world model in bfloat16 (a bfloat16 copy of `model`, its cache in
        bfloat16; the sampler and the EDM preconditioning stay in float32). Faster for large
        batches on CPUs with AMX (`bf16_model_pays`); on 40 held-out Memory Maze windows the bundled
        model scored 25.56 dB teacher-forced and 17.19 open loop over 32 frames, against 25.59
        and 17.19 in float32."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if sampler_steps < 1:
            raise ValueError(f"sampler_steps must be >= 1, got {sampler_steps}")
        cfg = model.cfg
        if tuple(codec.config.latent_shape) != (cfg.latent_channels, *cfg.latent_grid):
            raise ValueError(
                f"codec latents {codec.config.latent_shape} do not fit the world model's "
                f"{(cfg.latent_channels, *cfg.latent_grid)}: pair the model with the codec it was trained with"
            )
        self.model = bfloat16_copy(model) if model_bf16 else model
        self.model_bf16 = model_bf16
        self._bf16_model: WorldModel | None = None  # in_bfloat16's copy, made once (a copy takes ~25 ms)
        self.codec = codec
        self.batch = batch
        self.sampler_steps = sampler_steps
        self.sampler_kwargs = {**dream_sampler(sampler_steps), **(sampler_kwargs or {})}
        self.fold_commit = FOLD_COMMIT if fold_commit is None else fold_commit
        self.decode_bf16 = decode_bf16  # FrameCodec.decode(bf16=...): faster batches, frames within 2 grey levels
        self._overlap_decode = overlap_decode
        if self.fold_commit and self.sampler_kwargs.get("solver", "dpm2m") == "heun":
            raise ValueError("fold_commit needs a solver with one denoiser call per step (dpm2m or euler), not heun")
        self.device = next(model.parameters()).device
        self._seeds = np.random.default_rng(seed)  # default per-stream seeds when reset gets none
        self.cache: WorldModelCache | None = None
        self.generators: list[torch.Generator] = []
        self.latents: torch.Tensor | None = None  # (B, C, h, w) the last committed frame

    # -- inputs ---------------------------------------------------------------------------------

    @property
    def discrete(self) -> bool:
        return self.model.cfg.action_kind == "discrete"

    def _actions(self, actions, lead: tuple[int, ...]) -> torch.Tensor:
        """Validate actions of shape `lead` (+ (D,) if continuous); a torch tensor on the device."""
        cfg = self.model.cfg
        a = torch.as_tensor(np.asarray(actions) if not isinstance(actions, torch.Tensor) else actions)
        if self.discrete:
            want = lead
            if a.dtype.is_floating_point or a.dtype == torch.bool or a.is_complex():
                raise TypeError(f"discrete actions must be integers, got dtype {a.dtype}")
            if tuple(a.shape) != want:
                raise ValueError(f"discrete actions must have shape {want}, got {tuple(a.shape)}")
            if a.numel() and (a.min() < 0 or a.max() >= cfg.n_actions):
                raise ValueError(f"discrete actions must be in [0, {cfg.n_actions}), got {a.flatten().tolist()}")
            return a.long().to(self.device)
        want = (*lead, cfg.action_dim)
        if not a.dtype.is_floating_point:
            raise TypeError(f"continuous actions must be floats, got dtype {a.dtype}")
        if tuple(a.shape) != want:
            raise ValueError(f"continuous actions must have shape {want}, got {tuple(a.shape)}")
        if not torch.isfinite(a).all():
            raise ValueError("continuous actions contain NaN or inf")
        return a.float().to(self.device)

    def _context(self, frames, actions, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> latents (b, T0, C, h, w), conditioning actions (b, T0[, D]), no_action (b, T0)."""
        frames = torch.as_tensor(frames)
        if frames.dtype != torch.uint8:
            raise TypeError(f"context frames must be uint8, got {frames.dtype}")
        if frames.ndim != 5 or frames.shape[0] != batch or frames.shape[-1] != 3:
            raise ValueError(f"context frames must be ({batch}, T0, H, W, 3) uint8, got {tuple(frames.shape)}")
        T0 = frames.shape[1]
        if T0 < 1:
            raise ValueError("the context needs at least one frame")
        acts = self._actions(actions, (batch, T0 - 1))  # action t led to frame t + 1
        latents = self.codec.encode(frames.to(self.device))  # (b, T0, C, h, w)
        if self.discrete:
            first = torch.full((batch, 1), self.model.cfg.n_actions, dtype=torch.long, device=self.device)
        else:
            first = torch.zeros(batch, 1, self.model.cfg.action_dim, device=self.device)  # masked below
        cond = torch.cat([first, acts], dim=1)  # (b, T0[, D])
        no_action = torch.zeros(batch, T0, dtype=torch.bool, device=self.device)
        no_action[:, 0] = True
        return latents, cond, no_action

    def _generators(self, seeds: Sequence[int] | None, n: int) -> list[torch.Generator]:
        if seeds is None:
            seeds = self._seeds.integers(0, 2**63 - 1, size=n).tolist()
        if len(seeds) != n:
            raise ValueError(f"need one seed per stream ({n}), got {len(seeds)}")
        return [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def _require_reset(self) -> None:
        if self.cache is None:
            raise RuntimeError("call reset(context_frames, context_actions) before stepping")

    # -- the dream loop ---------------------------------------------------------------------------

    @torch.no_grad()
    def _prefill(self, frames, actions, batch: int) -> tuple[WorldModelCache, torch.Tensor]:
        """A fresh cache for `batch` streams that have seen the context (each from its frame 0)."""
        latents, cond, no_action = self._context(frames, actions, batch)
        cache = self.model.allocate_cache(batch, device=self.device)
        sigma = torch.zeros(latents.shape[:2], device=self.device)
        self.model(latents, sigma, cond, cache=cache, no_action=no_action)
        return cache, latents[:, -1]

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> uint8 frames (B, H, W, 3) on the CPU."""
        return self.codec.decode(latents, as_uint8=True, bf16=self.decode_bf16).cpu()

    @property
    def overlap_decode(self) -> bool:
        """Decode each new frame on a worker thread while the commit runs (None at construction:
        where `overlap_pays`, i.e. from batch 8 on a CPU with a core the torch threads leave free).

        The decode and the commit both read the sampled latent and neither writes what the other
        reads, so the results are the same (a test checks it); torch releases the GIL inside its
        ops, so on a CPU the two run at once. The bundled model's dream env on 2 cores, 1 torch
        thread, medians of 3 alternating runs: batch 8 from 91 to 140 frames/s, batch 64 from 177
        to 199, at the cost of more CPU time per frame (the two threads slow each other: batch 64
        gave 155 frames per CPU-second against 177). At batch 1 nothing was gained (27.4 against
        29.8 frames/s; the decode is 6 ms and the commit slows beside it), so it stays off there.
        """
        return overlap_pays(self.device, self.batch) if self._overlap_decode is None else self._overlap_decode

    @overlap_decode.setter
    def overlap_decode(self, value: bool | None) -> None:
        self._overlap_decode = value

    def _decode_off_thread(self, latents: torch.Tensor, threads: int) -> torch.Tensor:
        # Grad mode and the CPU thread count are per thread: the worker takes the caller's.
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.no_grad():
            return self._decode(latents)

    @torch.no_grad()
    def reset(self, context_frames, context_actions, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Start all B streams from real context: frames uint8 (B, T0, H, W, 3), actions (B, T0 - 1)
        int or (B, T0 - 1, D) float. `seeds`: one per stream for its noise generator (default:
        drawn from the session's seed). Returns the last context frame as the codec reconstructs
        it, uint8 (B, H, W, 3) on the CPU (what the model "sees")."""
        cache, last = self._prefill(context_frames, context_actions, self.batch)
        self.cache, self.latents = cache, last
        self.generators = self._generators(seeds, self.batch)
        return self._decode(last)

    @torch.no_grad()
    def step(self, actions, decode: bool = True, timings: dict[str, float] | None = None) -> StepResult:
        """One new frame per stream for actions (B,) int or (B, D) float.

        decode=False leaves the frames undecoded (`StepResult.frames` is None), for planners that
        score latents, rewards and terminations: on a CPU the codec's decoder is a large share of
        a dreamed step (more than the world model itself with one sampler call per frame).
        timings: a dict to which the seconds of the step's phases are added, "denoise" (the
        sampler's calls, with the frame's shared work), "commit" (the committing call) and
        "decode" (0 without decoding); `worldsim bench rollout` reads them.
        """
        return self._advance(actions, decode, timings)

    @torch.no_grad()
    def observe(self, actions, frames=None, *, latents: torch.Tensor | None = None, decode: bool = False,
                timings: dict[str, float] | None = None) -> StepResult:
        """Teacher forcing: predict each stream's next frame as `step` would (the result's latents,
        frames, reward and termination are the prediction's), then commit the REAL next frame,
        given as uint8 `frames` (B, H, W, 3) or as their `latents` (B, C, h, w), so the next
        prediction again starts from the real past. The generators advance as in `step`."""
        if (frames is None) == (latents is None):
            raise ValueError("observe takes the real next frame as frames or as latents (one of them)")
        if latents is None:
            latents = self._encode(frames, (self.batch,))
        cfg = self.model.cfg
        shape = (self.batch, cfg.latent_channels, *cfg.latent_grid)
        if tuple(latents.shape) != shape:
            raise ValueError(f"observed latents must have shape {shape}, got {tuple(latents.shape)}")
        return self._advance(actions, decode, timings, observed=latents.to(self.device))

    def _advance(self, actions, decode: bool, timings: dict[str, float] | None,
                 observed: torch.Tensor | None = None) -> StepResult:
        self._require_reset()
        clock = _PhaseClock(timings, self.device)
        a = self._actions(actions, (self.batch,))
        # The sampler's denoiser calls and the commit share the frame's common work (FrameStep).
        frame = self.model.begin_frame(self.cache, a, actions_checked=True)
        shape = (self.batch, *self.latents.shape[1:])
        fold = self.fold_commit and observed is None
        folded: list[WorldModelOutput] = []
        calls = 0

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            if not (fold and calls == self.sampler_steps):
                return frame.denoise(x, sigma)
            # The last call (at sigma_min) commits the nearly clean frame it denoises: one network
            # call fewer per frame; later frames see this one's tokens from sigma_min, a noise
            # level diffusion forcing trained them to read.
            folded.append(frame.commit(x, sigma))
            return folded[0].denoised

        latent = sample_next_frames(denoise, shape, self.generators, self.sampler_steps,
                                    device=self.device, **self.sampler_kwargs)
        clock.lap("denoise")
        committed = latent if observed is None else observed
        decoding = None
        if decode and not folded and self.overlap_decode:
            decoding = _decode_thread().submit(self._decode_off_thread, latent, torch.get_num_threads())
        if folded:
            out = folded[0]
            if self.cache.recent is not None:  # the direct path shows later frames the clean latent
                self.cache.recent[:, -1] = latent.to(self.cache.recent)
        else:
            out = frame.commit(committed)
        self.latents = committed  # the last committed frame: the real one under teacher forcing
        result = _result(out, latent)
        clock.lap("commit")
        if decoding is not None:
            result.frames = decoding.result()
        else:
            result.frames = self._decode(latent) if decode else None
        clock.lap("decode")
        return result

    def show_direct_path(self, latents: torch.Tensor) -> None:
        """Replace the last committed frame as the direct path shows it to the frames after it,
        (B, C, h, w) latents; the backbone's cache keeps what was committed. A diagnostic (`worldsim
        eval prediction --pathways`): which route from the past carries a dream's error."""
        self._require_reset()
        if self.cache.recent is None:
            raise ValueError("this model has no direct path (prev_frames = 0)")
        shape = (self.batch, *self.cache.recent.shape[2:])
        if tuple(latents.shape) != shape:
            raise ValueError(f"direct-path latents must have shape {shape}, got {tuple(latents.shape)}")
        self.cache.recent[:, -1] = latents.to(self.cache.recent)

    @torch.no_grad()
    def extend(self, frames, actions) -> None:
        """Commit real frames uint8 (B, n, H, W, 3) that follow each stream's last frame, with the
        actions that led to them, (B, n) int or (B, n, D) float (actions[:, j] was taken at the
        frame before frames[:, j]), in one parallel forward at sigma 0. reset(context[:, :k]) then
        extend(context[:, k:]) leaves the state reset(context) would, in less memory."""
        self._require_reset()
        frames = torch.as_tensor(frames)
        if frames.ndim != 5 or frames.shape[0] != self.batch:
            raise ValueError(f"frames must be ({self.batch}, n, H, W, 3) uint8, got {tuple(frames.shape)}")
        n = frames.shape[1]
        acts = self._actions(actions, (self.batch, n))
        latents = self._encode(frames, (self.batch, n))  # (B, n, C, h, w)
        sigma = torch.zeros(self.batch, n, device=self.device)
        self.model(latents, sigma, acts, cache=self.cache)
        self.latents = latents[:, -1]

    @torch.no_grad()
    def commit(self, actions, latents: torch.Tensor) -> StepResult:
        """Advance every stream by the given latents (B, C, h, w), no sampling: the state a rollout
        that produced them leaves (benchmarks that need a long history fast). Frames not decoded."""
        self._require_reset()
        a = self._actions(actions, (self.batch,))
        self.latents = latents.to(self.device)
        return _result(self.model.begin_frame(self.cache, a, actions_checked=True).commit(self.latents), self.latents)

    def _encode(self, frames, lead: tuple[int, ...]) -> torch.Tensor:
        """uint8 frames (*lead, H, W, 3) -> latents (*lead, C, h, w) on the session's device."""
        frames = torch.as_tensor(frames)
        if frames.dtype != torch.uint8:
            raise TypeError(f"frames must be uint8, got {frames.dtype}")
        s = self.codec.config.image_size
        if tuple(frames.shape) != (*lead, s, s, 3):
            raise ValueError(f"frames must have shape {(*lead, s, s, 3)}, got {tuple(frames.shape)}")
        return self.codec.encode(frames.to(self.device))

    # -- forking ---------------------------------------------------------------------------------

    def _child(self, cache: WorldModelCache, idx: list[int]) -> RolloutSession:
        child = RolloutSession.__new__(RolloutSession)
        child.__dict__.update(self.__dict__)
        child.batch = len(idx)
        child.cache = cache
        child.generators = [_copy_generator(self.generators[i]) for i in idx]
        child.latents = self.latents[torch.as_tensor(idx, device=self.device)]
        child._seeds = np.random.default_rng(self._seeds.integers(0, 2**63 - 1))
        return child

    def select(self, indices: Sequence[int]) -> RolloutSession:
        """A new session over streams `indices` (repeats allowed), copied; this one is unchanged."""
        self._require_reset()
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("select needs at least one stream index")
        if min(idx) < 0 or max(idx) >= self.batch:
            raise IndexError(f"stream indices {idx} out of range for {self.batch} streams")
        return self._child(self.cache.select(idx), idx)

    def in_bfloat16(self) -> RolloutSession:
        """A new session over copies of these streams with the world model in bfloat16 (as
        `model_bf16=True`: its cache converted, the generators and latents copied); this one is
        unchanged. E.g. to dream many candidates from one float32 live stream (planners)."""
        self._require_reset()
        if self.model_bf16:
            return self.select(range(self.batch))
        if self._bf16_model is None:  # forks share it too: a planner's live session makes it once
            self._bf16_model = bfloat16_copy(self.model)
        child = self._child(self.cache.to(dtype=torch.bfloat16), list(range(self.batch)))
        child.model, child.model_bf16 = self._bf16_model, True
        return child

    def fork(self, n: int) -> RolloutSession:
        """Each stream repeated n times (stream-major: rows b n .. b n + n - 1 copy stream b), with
        copies of its generator, so all n copies dream the same future until their actions differ."""
        if n < 1:
            raise ValueError(f"fork needs n >= 1, got {n}")
        return self.select([b for b in range(self.batch) for _ in range(n)])

    def state_nbytes(self) -> int:
        """Bytes of the streaming state (fixed for every variant except causal_full)."""
        self._require_reset()
        return self.cache.nbytes()

    @property
    def frames_seen(self) -> int:
        """Frames the batch has written to the cache since `reset` (context included); a stream
        restarted by `reset_streams` has seen fewer of its own."""
        self._require_reset()
        return self.cache.frames_seen

    # -- partial reset ---------------------------------------------------------------------------

    @torch.no_grad()
    def reset_streams(self, indices: Sequence[int], context_frames, context_actions,
                      seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Re-start streams `indices` from new context (shapes as in `reset`, batch len(indices));
        the other streams keep going. Returns the new streams' last context frames (k, H, W, 3).

        The new streams are prefilled on their own (from their frame 0) and their rows of the
        cache overwritten (`WorldModelCache.assign`): each then dreams exactly what a fresh
        single-stream session reset from that context dreams, whatever the context length and
        however far the batch has run (causal_full included: its rows then differ in length).
        """
        self._require_reset()
        idx = [int(i) for i in indices]
        if not idx:
            return torch.empty(0, *self._decode(self.latents[:1]).shape[1:], dtype=torch.uint8)
        if len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= self.batch:
            raise ValueError(f"stream indices {idx} must be distinct and in [0, {self.batch})")
        fresh, last = self._prefill(context_frames, context_actions, len(idx))
        self.cache.assign(idx, fresh)
        latents = self.latents.clone()  # a fork may share the old tensor
        latents[torch.as_tensor(idx, device=self.device)] = last
        self.latents = latents
        for i, g in zip(idx, self._generators(seeds, len(idx))):
            self.generators[i] = g
        return self._decode(last)
