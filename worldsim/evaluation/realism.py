"""`worldsim eval realism`: do long dreams still look like the world, or melt into blur?

PSNR against the real future cannot answer this: after a few dozen open-loop frames the dream
and the real episode have diverged, and the frame closest in PSNR to anything is a blurry average
(we checked: PSNR to the nearest real frame rewards blur). Two scores that do not reward it:

  * **Sharpness**: the mean squared luminance gradient (finite differences) inside the frame,
    leaving out a `border` of pixels (Memory Maze draws the target colour there as a flat frame,
    which no model gets wrong). Blur removes gradient energy, so a blurred frame scores below
    the original. Reported as a ratio to real frames of the same dataset, and to the codec's
    reconstructions of those frames, the sharpest a latent model can be: ~1.0 there is as
    sharp as the codec allows. Noise would also raise it, which is why it comes with:
  * **Fréchet feature distance** (as FID, Heusel et al. 2017, arXiv 1706.08500), between dreamed
    and real frames, on features of a network trained here on this data: the frame codec's
    encoder, per-channel mean and standard deviation of its activations at every resolution
    (64x64 down to 8x8). Blur, noise, wrong colours or layouts all move the feature
    distribution away from the real one. The codec's reconstructions give the floor.

Protocol: `streams` dreams start from real context frames of the held-out dataset (seeded start
points) and run `steps` frames under a random walk with persistence (the data-collection
policy's default), so every bucket of frames (1-50, 100-200, 500-1000 by default) is scored on
the same dreams. The reference pool is `reference_frames` real frames spread over the dataset.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from worldsim.codec.autoencoder import Downsample
from worldsim.data.episode_store import EpisodeStore
from worldsim.evaluation.metrics import sharpness
from worldsim.evaluation.prediction import check_compatible
from worldsim.loading import load_dream_model
from worldsim.rollout.session import RolloutSession
from worldsim.train.distributed import resolve_device


DEFAULT_BUCKETS = ((1, 50), (100, 200), (500, 1000))


# ------------------------------------------------------------------------------ the scores
@torch.no_grad()
def codec_features(codec, frames: torch.Tensor | np.ndarray, batch: int = 256) -> torch.Tensor:
    """Features of uint8 frames (N, H, W, 3) for the Fréchet distance -> (N, F) float64.

    Per resolution level of the codec's encoder (and its latent): each channel's mean and standard
    deviation over positions. Means see colour and layout, standard deviations see texture and
    edges, which blur takes away.
    """

    frames = torch.as_tensor(frames)
    enc = codec.encoder
    device = codec.latent_mean.device
    out = []
    for part in frames.split(batch):
        x = part.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        h = enc.conv_in(x)
        pooled = []
        for layer in enc.body:
            if isinstance(layer, Downsample):  # the end of a resolution level
                pooled += [h.mean((2, 3)), h.std((2, 3))]
            h = layer(h)
        pooled += [h.mean((2, 3)), h.std((2, 3))]
        z = enc.conv_out(torch.nn.functional.silu(enc.norm_out(h)))
        pooled += [z.mean((2, 3)), z.std((2, 3))]
        out.append(torch.cat(pooled, dim=1).double().cpu())
    return torch.cat(out)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (N, F), (M, F).

    The trace of the matrix square root is taken as the sum of square roots of the eigenvalues of
    S_a^(1/2) S_b S_a^(1/2) (symmetric, so a stable eigendecomposition serves)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets (N >= 2, F) of one width, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    inner = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0)
    value = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * inner.sqrt().sum()
    return float(value.clamp_min(0))


# ------------------------------------------------------------------------------ the evaluation
@dataclass
class RealismEvalConfig:
    checkpoint: str
    """World-model run, checkpoint or bundle folder."""
    dataset: str
    """Minari dataset id or path with held-out episodes (context frames and the reference pool)."""
    codec: str | None = None
    """Codec checkpoint; None uses the one the world model records."""
    steps: int = 1000
    """Frames dreamed per stream after the context."""
    streams: int = 8
    """Dreams run side by side (one batch)."""
    context: int = 9
    """Real frames prefilled before dreaming."""
    buckets: tuple[tuple[int, int], ...] = DEFAULT_BUCKETS
    """Ranges of dreamed frame numbers (1-based, inclusive) scored together."""
    persistence: float = 0.8
    """Random-walk policy: probability of repeating the previous action."""
    reference_frames: int = 2000
    """Real frames in the reference pool, spread over the dataset's episodes."""
    border: int = 4  # metrics.MAZE_BORDER (a literal: the CLI reads its defaults from the source)
    """Pixels left out at each edge by the sharpness score (Memory Maze's target-colour frame)."""
    sampler_steps: int = 2
    """Denoiser calls per dreamed frame."""
    sampler: dict | None = None
    """Other sampler settings (sigma_max, sigma_min, rho, solver; `diffusion.sampler`); None: its defaults."""
    seed: int = 0
    """Fixes the start points, the actions and the sampler noise."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu" or "cuda"."""

    def validate(self) -> None:
        for name in ("steps", "streams", "context", "reference_frames", "sampler_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.persistence < 1:
            raise ValueError(f"persistence must be in [0, 1), got {self.persistence}")
        for lo, hi in self.buckets:
            if not 1 <= lo <= hi:
                raise ValueError(f"bucket ({lo}, {hi}) must satisfy 1 <= first <= last")


def random_walk_actions(n_actions: int, streams: int, steps: int, persistence: float,
                        rng: np.random.Generator) -> np.ndarray:
    """(streams, steps) int64 actions: each step repeats the last action with `persistence`, else
    draws uniformly (the collection policy `data.exploration.RandomWalk`, vectorised)."""
    actions = np.empty((streams, steps), dtype=np.int64)
    current = rng.integers(n_actions, size=streams)
    for t in range(steps):
        redraw = rng.random(streams) >= persistence
        current = np.where(redraw, rng.integers(n_actions, size=streams), current)
        actions[:, t] = current
    return actions


def reference_pool(store, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` real frames (uint8 (N, H, W, 3)) spread evenly over every episode of the store."""
    steps = np.asarray(store.episode_steps)
    per_episode = max(1, int(np.ceil(count / len(steps))))
    frames = []
    for ep, n in enumerate(steps):
        take = min(per_episode, int(n))
        for start in np.sort(rng.choice(int(n), size=take, replace=False)):
            frames.append(store.read(ep, int(start), 1)["frames"][0])
    frames = np.stack(frames)
    return frames[rng.permutation(len(frames))[:count]]


def evaluate_realism(cfg: RealismEvalConfig, progress: bool = False) -> dict[str, Any]:
    """Dream `streams` x `steps` frames and score the buckets (module doc); a JSON-able dict."""
    cfg.validate()
    buckets = [(lo, min(hi, cfg.steps)) for lo, hi in cfg.buckets if lo <= cfg.steps]
    if not buckets:
        raise ValueError(f"no bucket starts within the {cfg.steps} dreamed frames: {cfg.buckets}")
    store = EpisodeStore(cfg.dataset)
    device = resolve_device(cfg.device)
    model, codec = load_dream_model(cfg.checkpoint, cfg.codec, device=device)
    model.eval()
    codec.eval()
    if model.cfg.action_kind != "discrete":
        raise ValueError("eval realism drives the dream with a random walk over discrete actions; this model takes continuous ones")
    check_compatible(store, model, codec)
    rng = np.random.default_rng(cfg.seed)
    try:
        # Context: one seeded start per stream, episodes taken in turn.
        steps = np.asarray(store.episode_steps)
        long_enough = np.flatnonzero(steps >= cfg.context)
        if not len(long_enough):
            raise ValueError(f"no episode of {cfg.dataset} has the {cfg.context} context frames")
        frames, ctx_actions = [], []
        for s in range(cfg.streams):
            ep = int(long_enough[s % len(long_enough)])
            start = int(rng.integers(int(steps[ep]) - cfg.context + 1))
            clip = store.read(ep, start, cfg.context)
            frames.append(clip["frames"])
            ctx_actions.append(clip["actions"][: cfg.context - 1])
        real = reference_pool(store, cfg.reference_frames, rng)
    finally:
        store.close()
    actions = random_walk_actions(model.cfg.n_actions, cfg.streams, cfg.steps, cfg.persistence, rng)

    session = RolloutSession(model, codec, batch=cfg.streams, sampler_steps=cfg.sampler_steps, sampler_kwargs=cfg.sampler)
    session.reset(np.stack(frames), np.stack(ctx_actions), seeds=rng.integers(0, 2**63 - 1, cfg.streams).tolist())
    wanted = {t for lo, hi in buckets for t in range(lo, hi + 1)}
    kept: dict[int, torch.Tensor] = {}
    start = time.perf_counter()
    with torch.no_grad():
        for t in tqdm(range(1, cfg.steps + 1), desc="eval realism", unit="frame", disable=not progress, dynamic_ncols=True):
            out = session.step(actions[:, t - 1], decode=t in wanted)
            if t in wanted:
                kept[t] = out.frames  # (streams, H, W, 3) uint8
    seconds = time.perf_counter() - start

    with torch.no_grad():
        recon = codec.decode(codec.encode(torch.as_tensor(real).to(device)), as_uint8=True).cpu()
    real_t = torch.as_tensor(real)
    real_sharp = float(sharpness(real_t, cfg.border).mean())
    recon_sharp = float(sharpness(recon, cfg.border).mean())
    real_feats = codec_features(codec, real_t)
    results_buckets = []
    for lo, hi in buckets:
        dreamed = torch.cat([kept[t] for t in range(lo, hi + 1)])  # (frames in bucket * streams, H, W, 3)
        s = float(sharpness(dreamed, cfg.border).mean())
        results_buckets.append({
            "first": lo, "last": hi, "frames": len(dreamed),
            "sharpness": s,
            "sharpness_vs_real": s / real_sharp,
            "sharpness_vs_codec": s / recon_sharp,
            "frechet": frechet_distance(codec_features(codec, dreamed), real_feats),
        })
    # The floor of the distance for a pool of this size: the codec's reconstructions of half the
    # real pool against the other half (the same number of frames on each side as a bucket gets
    # against the pool would be fairer, but the pool is what every bucket is compared with).
    half = len(real) // 2
    floor = frechet_distance(codec_features(codec, recon[:half]), codec_features(codec, real_t[half:]))
    return {
        "config": {**asdict(cfg), "buckets": [list(b) for b in cfg.buckets]},
        "device": str(device),
        "reference": {
            "frames": len(real),
            "sharpness_real": real_sharp,
            "sharpness_codec": recon_sharp,
            "codec_vs_real": recon_sharp / real_sharp,
            "frechet_codec_floor": floor,
        },
        "buckets": results_buckets,
        "seconds": seconds,
        "dreamed_frames_per_s": cfg.streams * cfg.steps / seconds,
    }


def format_table(results: dict[str, Any]) -> str:
    cfg, ref = results["config"], results["reference"]
    lines = [
        f"Realism of {cfg['streams']} dreams x {cfg['steps']} frames on {cfg['dataset']} (random walk, "
        f"persistence {cfg['persistence']}, {cfg['sampler_steps']} sampler steps, seed {cfg['seed']})",
        f"  reference: {ref['frames']} real frames; codec reconstructions keep {ref['codec_vs_real']:.2f} of their "
        f"sharpness; Fréchet distance codec vs real (half pools) {ref['frechet_codec_floor']:.2f}",
        f"  {'frames':<12}{'sharpness/real':>16}{'/codec':>10}{'Fréchet':>10}",
    ]
    for b in results["buckets"]:
        lines.append(f"  {str(b['first']) + '-' + str(b['last']):<12}{b['sharpness_vs_real']:>16.2f}"
                     f"{b['sharpness_vs_codec']:>10.2f}{b['frechet']:>10.2f}")
    lines.append(f"  {results['seconds']:.1f} s on {results['device']} ({results['dreamed_frames_per_s']:.1f} dreamed frames/s)")
    return "\n".join(lines)
