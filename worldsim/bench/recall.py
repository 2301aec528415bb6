"""`worldsim bench recall`: can a variant learn to remember at all? A synthetic recall task.

The memory evaluation on Memory Maze (`worldsim eval memory`) has found no model here that uses
anything from beyond its attention window. That leaves two explanations: the data and budget do
not reward memory enough, or the architecture (or its implementation) cannot carry a frame across
many frames in the first place. This benchmark separates them with a task that needs nothing but
memory, small enough to train on a CPU in minutes.

The task, in latent space (no codec): a sequence of T frames of C x h x w latents. Frame 0 shows
one of K fixed random patterns (unit variance, drawn once from the seed); the frames after it are
blank (zeros) under the action "wait"; the last frame, under the action "recall", shows frame 0's
pattern again. The recall lies T - 1 frames after the cue, beyond every attention window the
benchmark uses, so a sliding-window model cannot see the cue and can only guess (its best guess,
the mean of the patterns, scores a mean squared error of about 1); a model whose state carries the
cue can bring it back (error near 0).

Each variant trains from scratch on fresh sequences with the diffusion-forcing loss the world
models train with (`model.loss.world_model_loss`, half the sequences with a clean prefix), then is
scored on held-out sequences: the context frames 0 .. T - 2 committed clean, the recall frame
denoised in one call from pure noise at sigma 20 (the model's mean estimate of it). Reported: the
mean squared error against the cue's pattern, the share of recalls nearest to the right pattern
(chance 1/K), and the same for the model's guess at frame 1 (blank, where nothing has to be
remembered) as a check that the model learned the easy part.

What it found (README "Memory"): with the plain training noise the LSSVWM had not learned the
recall after 4,000 steps; with the frames after the clean prefix kept noisy
(`min_sigma_after_prefix`) it did within 1,500. Under log-normal noise most training recall frames
are nearly clean and give themselves away, so remembering the cue earns little; the floor makes
the state the only way to them. At Memory Maze's frame shape (--channels 64) it learned the recall
by 4,000 steps either way, with a quarter of the error with the floor.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from worldsim.diffusion.forcing import ForcingConfig
from worldsim.model.conditioning import shift_actions
from worldsim.model.config import VARIANTS, make_config
from worldsim.model.loss import world_model_loss
from worldsim.model.world_model import WorldModel
from worldsim.utils.training import warmup_cosine

WAIT, RECALL = 0, 1


@dataclass
class RecallBenchConfig:
    variants: tuple[str, ...] = ("lssvwm", "causal_window", "mamba_only")
    """Variants trained side by side (worldsim.model.config.VARIANTS)."""
    frames: int = 16
    """Frames per sequence T: the cue is frame 0, the recall frame T - 1."""
    patterns: int = 8
    """K: how many different cues there are."""
    channels: int = 4
    """Latent channels C of every frame."""
    grid: int = 4
    """Latent grid h = w (patch 1: h * w tokens a frame)."""
    d_model: int = 64
    """Width of every variant."""
    layers: int = 2
    """Blocks of every variant."""
    attn_window: int = 4
    """Attention window (frames) of the variants with attention; must be < frames - 1."""
    steps: int = 1500
    """Training steps of each variant. Attention learns the recall steadily. With the plain noise,
    mamba_only sits on a plateau and crosses it late (with --grid 2 between steps 3,000 and 3,500)
    and the LSSVWM had not crossed it by 4,000; with --min-sigma-after-prefix both learn it within
    1,500. At Memory Maze's frame shape (--channels 64) the LSSVWM needs about 4,000 steps, with
    or without the floor. README "Memory"."""
    batch_size: int = 32
    """Sequences per training step."""
    lr: float = 1e-3
    """AdamW learning rate (cosine to a tenth after 50 warm-up steps)."""
    p_long_context: float = 0.5
    """Share of training sequences with a clean prefix (`ForcingConfig.p_long_context`; > 0: the
    reward / termination heads train on it), as the world models train."""
    min_sigma_after_prefix: float = 0.0
    """Memory training (`ForcingConfig.min_sigma_after_prefix`): in sequences with a clean prefix,
    the frames after it (the recall among them) draw noise levels of at least this sigma, so the
    recall frame is rarely nearly clean in training, where it can be read off its own noisy
    version instead of remembered. 0 = off (the world models' default)."""
    eval_sequences: int = 256
    """Held-out sequences each variant is scored on."""
    seed: int = 0
    """Fixes the patterns, the data, the initial weights and the noise."""
    threads: int = 1
    """torch threads (0: leave as is)."""

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants must be a non-empty subset of {VARIANTS}, got {list(self.variants)}")
        if self.frames < 3 or not 1 <= self.attn_window < self.frames - 1:
            raise ValueError(f"need frames >= 3 and 1 <= attn_window < frames - 1 (the cue out of sight), "
                             f"got frames {self.frames}, attn_window {self.attn_window}")
        for name in ("patterns", "channels", "grid", "d_model", "layers", "steps", "batch_size", "eval_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patterns < 2:
            raise ValueError(f"patterns must be >= 2 (one cue leaves nothing to remember), got {self.patterns}")
        if not (self.lr > 0 and 0 < self.p_long_context <= 1):
            raise ValueError(f"need lr > 0 and p_long_context in (0, 1], got {self.lr}, {self.p_long_context}")
        self.forcing()  # the training noise's own checks (min_sigma_after_prefix), before any training

    def forcing(self) -> ForcingConfig:
        """The training noise: the world models' diffusion forcing with this task's settings."""
        return ForcingConfig(p_long_context=self.p_long_context, min_sigma_after_prefix=self.min_sigma_after_prefix)


def make_patterns(cfg: RecallBenchConfig) -> torch.Tensor:
    """(K, C, h, w) the cues, unit-variance Gaussian, fixed by the seed."""
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randn(cfg.patterns, cfg.channels, cfg.grid, cfg.grid, generator=g)


def make_sequences(patterns: torch.Tensor, batch: int, frames: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents (B, T, C, h, w), actions (B, T), cue index (B,)): cue at frame 0, blanks under
    "wait", the cue again at frame T - 1 under "recall". Actions are data-aligned, as datasets
    hold them: a_t is taken at frame t and leads to frame t + 1, so "recall" is a_{T-2}."""
    cue = torch.randint(0, patterns.shape[0], (batch,), generator=generator)
    latents = torch.zeros(batch, frames, *patterns.shape[1:])
    latents[:, 0] = latents[:, -1] = patterns[cue]
    actions = torch.full((batch, frames), WAIT, dtype=torch.long)
    actions[:, -2] = RECALL
    return latents, actions, cue


def build_model(cfg: RecallBenchConfig, variant: str) -> WorldModel:
    # A variant with a finite window (not mamba_only, not causal_full) gets the task's.
    windowed = make_config("tiny", variant=variant).attn_window is not None
    model_cfg = make_config("tiny", variant=variant, latent_channels=cfg.channels, latent_grid=(cfg.grid, cfg.grid),
                            patch=1, d_model=cfg.d_model, n_layers=cfg.layers, n_actions=2, prev_frames=0,
                            **({"attn_window": cfg.attn_window} if windowed else {}))
    return WorldModel(model_cfg)


def train(model: WorldModel, patterns: torch.Tensor, cfg: RecallBenchConfig, seed: int) -> list[float]:
    """Train on fresh sequences; the loss every 100 steps."""
    g = torch.Generator().manual_seed(seed)
    forcing = cfg.forcing()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    warmup = min(50, cfg.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, cfg.steps, warmup, 0.1))
    model.train()
    losses = []
    zeros = torch.zeros(cfg.batch_size, cfg.frames)
    for step in range(cfg.steps):
        latents, actions, _ = make_sequences(patterns, cfg.batch_size, cfg.frames, g)
        loss, _ = world_model_loss(model, latents, actions, zeros, zeros.bool(), generator=g, forcing_cfg=forcing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            losses.append(float(loss.detach()))
    return losses


@torch.inference_mode()
def estimate_frame(model: WorldModel, latents: torch.Tensor, actions: torch.Tensor, context: int,
                   generator: torch.Generator) -> torch.Tensor:
    """(B, C, h, w) the model's one-call estimate of frame `context` from pure noise at sigma 20,
    given frames 0 .. context - 1 clean (latents (B, T, ...), data-aligned actions (B, T))."""
    B = latents.shape[0]
    cache = model.allocate_cache(B)
    cond, no_action = shift_actions(actions[:, :context], model.cfg)  # frame t is conditioned on a_{t-1}
    model(latents[:, :context], torch.zeros(B, context), cond, cache=cache, no_action=no_action)
    frame = model.begin_frame(cache, actions[:, context - 1])
    sigma = torch.full((B,), 20.0)
    return frame.denoise(sigma[:, None, None, None] * torch.randn(latents[:, 0].shape, generator=generator), sigma)


@torch.inference_mode()
def score(model: WorldModel, patterns: torch.Tensor, cfg: RecallBenchConfig, seed: int) -> dict[str, float]:
    """Recall error and accuracy on held-out sequences, and the same at frame 1 (a blank)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    latents, actions, cue = make_sequences(patterns, cfg.eval_sequences, cfg.frames, g)
    recalled = estimate_frame(model, latents, actions, latents.shape[1] - 1, g)
    distance = (recalled[:, None] - patterns[None]).square().flatten(2).mean(-1)  # (B, K)
    blank = estimate_frame(model, latents, actions, 1, g)
    return {"recall_mse": float((recalled - latents[:, -1]).square().mean()),
            "recall_accuracy": float((distance.argmin(1) == cue).float().mean()),
            "guess_mse": float((patterns.mean(0) - latents[:, -1]).square().mean()),
            "blank_mse": float(blank.square().mean())}


def run(cfg: RecallBenchConfig, progress: bool = False) -> dict[str, Any]:
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    patterns = make_patterns(cfg)
    results: dict[str, Any] = {"config": asdict(cfg), "variants": {}}
    for i, variant in enumerate(cfg.variants):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, variant)
        start = time.perf_counter()
        losses = train(model, patterns, cfg, seed=cfg.seed + 1)
        seconds = time.perf_counter() - start
        scores = score(model, patterns, cfg, seed=cfg.seed + 2)
        results["variants"][variant] = {"parameters": model.num_parameters(), "train_seconds": seconds,
                                        "losses": losses, **scores}
        if progress:
            print(f"  [{i + 1}/{len(cfg.variants)}] {variant}: recall mse {scores['recall_mse']:.3f}, "
                  f"accuracy {scores['recall_accuracy']:.2f} ({seconds:.0f} s)", flush=True)
    return results


def format_table(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [f"Recall across {cfg['frames'] - 1} frames ({cfg['patterns']} cues, attention window "
             f"{cfg['attn_window']}, {cfg['steps']} steps of {cfg['batch_size']}, seed {cfg['seed']}; "
             f"{cfg['eval_sequences']} held-out sequences"
             + (f"; noise after the clean prefix >= sigma {cfg['min_sigma_after_prefix']:g}" if cfg["min_sigma_after_prefix"] else "")
             + ")",
             f"  {'variant':<16}{'parameters':>12}{'recall mse':>12}{'accuracy':>10}{'blank mse':>11}{'train s':>9}"]
    for variant, r in results["variants"].items():
        lines.append(f"  {variant:<16}{r['parameters']:>12,}{r['recall_mse']:>12.3f}{r['recall_accuracy']:>10.2f}"
                     f"{r['blank_mse']:>11.3f}{r['train_seconds']:>9.0f}")
    first = next(iter(results["variants"].values()))
    lines.append(f"  guessing the mean cue: mse {first['guess_mse']:.3f}, accuracy {1 / cfg['patterns']:.2f} (chance)")
    return "\n".join(lines)
