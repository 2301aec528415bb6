"""`worldsim eval prediction`: how well a world model predicts real episodes it has not seen.

    results = evaluate_prediction(PredictionEvalConfig(checkpoint="runs/wm", dataset="worldsim/mm9-test-v0"))
    print(format_table(results))

Windows. From each evaluated episode, `starts_per_episode` start points s are drawn (seeded,
without repeats) among those with a whole window inside the episode: `context` real frames
o_s .. o_{s+C-1} (with the C - 1 actions between them) followed by `horizon` target frames
o_{s+C} .. o_{s+C+H-1}, each reached by its true action. Target step t = 1..H is frame
o_{s+C-1+t}. Windows run as B parallel streams of one `RolloutSession` (`batch_size` at a time);
every stream has its own noise generator, so a window's numbers do not depend on its batch mates.

Five PSNRs per (window, t), all on uint8 frames against the real target frame:

  * teacher-forced 1-step: the model sees the real past (the context, then every real target frame
    before t, each encoded and committed to the cache at sigma = 0) and samples frame t.
  * open loop: the model sees only the context and dreams frames 1..t from the true actions,
    each committed as it dreams it (`RolloutSession.step`).
  * codec ceiling: decode(encode(target)), the best any latent world model can score with this codec.
  * copy last frame: the last context frame as the prediction of every target (a model below it
    has learned less than "nothing moves"); the open-loop baseline.
  * copy previous frame: the real frame before each target, the teacher-forced baseline (at
    t = 1 it is the copy-last frame).

With `pathways` (models with a direct path), two half-open loops show where a dream's error
enters. A frame reaches later ones by two routes: the backbone's cache (SSM state and attention
keys, the long context) and the direct path (the last K committed latents, fed to each frame's
tokens). Each half-open loop gives one route the real frames and the other the model's own:

  * open loop, real direct path: each dreamed frame is committed to the backbone, and the direct
    path is shown the real frame instead.
  * open loop, real backbone: the real frame is committed to the backbone, and the direct path
    is shown the dreamed one.

Whichever scores nearer the teacher-forced row is the route the model can lean on; the other one
carries the open-loop error.

PSNR rewards blur (a sampler returning the model's mean estimate scores higher and looks worse), so
every prediction row also gets its **sharpness** per step: the image-gradient energy of the
predicted frames (`metrics.sharpness`, Memory Maze's border left out) as a share of the real
target frames' at the same step, the ratio of the means over windows. The codec ceiling row shows
how much of it a latent model can keep; a row that keeps the teacher-forced level in open loop does
not blur as it dreams.

All model predictions start from the same prefilled cache with the same generator states, so at
t = 1 teacher forcing and open loop predict the very same frame. PSNR values are averaged per
frame (the convention of video-prediction papers, and the paper's Memory Maze tables); identical
frames score the `psnr` cap of 100 dB, which only the copy baseline can hit (static scenes).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from worldsim.codec.autoencoder import psnr
from worldsim.data.episode_store import EpisodeStore
from worldsim.evaluation.metrics import sharpness
from worldsim.loading import load_dream_model
from worldsim.rollout.session import RolloutSession
from worldsim.train.distributed import resolve_device
from worldsim.utils.atomic import atomic_write_bytes


REPORTED_STEPS = (1, 4, 16)
"""Open-loop steps singled out in the table (with the horizon itself), when within the horizon."""


@dataclass
class PredictionEvalConfig:
    checkpoint: str
    """World-model run or checkpoint folder."""
    dataset: str
    """Minari dataset id or path holding the held-out episodes."""
    codec: str | None = None
    """Codec checkpoint; None uses the one the world model records."""
    episodes: int | None = None
    """Evaluate the first N episodes of the dataset; None: all of them."""
    context: int = 9
    """Real frames prefilled before predicting (C)."""
    horizon: int = 16
    """Frames predicted after the context (H)."""
    starts_per_episode: int = 4
    """Random start points per episode (fewer when the episode has fewer windows)."""
    sampler_steps: int = 2
    """Denoiser calls per predicted frame."""
    sampler: dict | None = None
    """Other sampler settings (sigma_max, sigma_min, rho, solver; `diffusion.sampler`); None: its defaults."""
    seed: int = 0
    """Fixes the start points and the sampler noise."""
    batch_size: int = 64
    """Windows streamed together (memory bound only: results do not depend on it)."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu" or "cuda"."""
    pathways: bool = False
    """Also the two half-open loops (module doc): which route from past frames carries the error."""

    def validate(self) -> None:
        for name in ("context", "horizon", "starts_per_episode", "sampler_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.episodes is not None and self.episodes < 1:
            raise ValueError(f"episodes must be >= 1 (or None for all), got {self.episodes}")


@dataclass
class Window:
    episode: int
    start: int
    seed: int
    """Seed of this stream's noise generator."""


# ------------------------------------------------------------------------------ windows
def choose_windows(episode_steps: np.ndarray, cfg: PredictionEvalConfig) -> tuple[list[Window], list[int]]:
    """Seeded start points -> (windows sorted by episode then start, episodes too short to evaluate).

    A window reads C + H steps from the store (observations and their actions; the last action is
    not used), so an episode of n steps holds n - (C + H) + 1 start points."""
    length = cfg.context + cfg.horizon
    n_eval = len(episode_steps) if cfg.episodes is None else min(cfg.episodes, len(episode_steps))
    rng = np.random.default_rng(cfg.seed)
    windows, short = [], []
    for ep in range(n_eval):
        n_starts = int(episode_steps[ep]) - length + 1
        if n_starts < 1:
            short.append(ep)
            continue
        starts = np.sort(rng.choice(n_starts, size=min(cfg.starts_per_episode, n_starts), replace=False))
        windows += [Window(ep, int(s), 0) for s in starts]
    if not windows:
        lengths = ", ".join(str(int(n)) for n in episode_steps[:n_eval][:10])
        raise ValueError(
            f"no episode is long enough: context {cfg.context} + horizon {cfg.horizon} = {length} steps "
            f"per window, the episodes have {lengths}{' ...' if n_eval > 10 else ''} steps; "
            f"lower --horizon or --context"
        )
    # Seeds drawn after all starts: the start points do not depend on how many windows there are.
    for w, s in zip(windows, rng.integers(0, 2**63 - 1, size=len(windows)).tolist()):
        w.seed = int(s)
    return windows, short


def read_windows(store, windows: list[Window], length: int) -> tuple[np.ndarray, np.ndarray]:
    """-> frames uint8 (B, C + H, H, W, 3), actions (B, C + H - 1[, D]): action i led to frame i + 1."""
    frames, actions = [], []
    for w in windows:
        steps = store.read(w.episode, w.start, length)
        frames.append(steps["frames"])
        actions.append(steps["actions"][: length - 1])
    return np.stack(frames), np.stack(actions)


def check_compatible(store, model, codec) -> None:
    """Clear errors for a dataset the model cannot be evaluated on (before any compute)."""
    s, c = codec.config.image_size, codec.config.image_channels
    if tuple(store.frame_shape) != (s, s, c):
        raise ValueError(f"{store.name}: frames {tuple(store.frame_shape)}, the codec takes {(s, s, c)}")
    cfg, space = model.cfg, store.action_space
    if cfg.action_kind == "discrete":
        if not isinstance(space, gym.spaces.Discrete) or int(space.n) != cfg.n_actions:
            raise ValueError(f"{store.name}: actions {space}, the model takes Discrete({cfg.n_actions})")
    elif not isinstance(space, gym.spaces.Box) or tuple(space.shape) != (cfg.action_dim,):
        raise ValueError(f"{store.name}: actions {space}, the model takes a Box of shape ({cfg.action_dim},)")


# ------------------------------------------------------------------------------ predictions
@torch.no_grad()
def teacher_forced_step(session, actions: torch.Tensor, real_latents: torch.Tensor) -> torch.Tensor:
    """Sample each stream's next latent from the session's cache without committing it (as
    `RolloutSession.step` does), then commit the REAL next latent instead, so the next prediction
    again starts from the real past. Returns the predicted latents (B, C, h, w)."""

    return session.observe(actions, latents=real_latents).latents


def real_direct_path_step(session, actions: torch.Tensor, real_latents: torch.Tensor) -> torch.Tensor:
    """Dream the next frame and commit it, then show the direct path the REAL frame instead."""
    predicted = session.step(actions, decode=False).latents
    session.show_direct_path(real_latents)
    return predicted


def real_backbone_step(session, actions: torch.Tensor, real_latents: torch.Tensor) -> torch.Tensor:
    """Teacher-forced step (the REAL frame is committed), then show the direct path the dreamed one."""
    predicted = session.observe(actions, latents=real_latents).latents
    session.show_direct_path(predicted)
    return predicted


@torch.no_grad()
def predict_windows(model, codec, frames: np.ndarray, actions: np.ndarray, context: int,
                    sampler_steps: int, seeds: list[int], sampler: dict | None = None,
                    pathways: bool = False) -> dict[str, torch.Tensor]:
    """Teacher-forced and open-loop predictions of the H = T - context frames after the context,
    and with `pathways` the two half-open loops (module doc).

    frames uint8 (B, T, H, W, 3), actions (B, T - 1[, D]). Returns uint8 (B, H, H, W, 3) CPU
    tensors by name: teacher_forced, open_loop[, real_direct_path, real_backbone]."""

    B, T = frames.shape[:2]
    horizon = T - context
    session = RolloutSession(model, codec, batch=B, sampler_steps=sampler_steps, sampler_kwargs=sampler)
    session.reset(frames[:, :context], actions[:, : context - 1], seeds=seeds)
    # Copies with the same cache and generator states: t = 1 is the same sample in every row.
    stepped = {"teacher_forced": (session.select(range(B)), teacher_forced_step)}
    if pathways:
        if not model.cfg.prev_frames:
            raise ValueError("pathways needs a model with a direct path (prev_frames > 0)")
        stepped["real_direct_path"] = (session.select(range(B)), real_direct_path_step)
        stepped["real_backbone"] = (session.select(range(B)), real_backbone_step)
    targets = torch.as_tensor(frames[:, context:])
    real_latents = codec.encode(targets.to(session.device))  # (B, H, C, h, w)
    step_actions = torch.as_tensor(actions[:, context - 1:]).to(session.device)  # (B, H[, D])
    if model.cfg.action_kind == "discrete":
        step_actions = step_actions.long()
    else:
        step_actions = step_actions.float()
    out: dict[str, list[torch.Tensor]] = {"open_loop": [], **{name: [] for name in stepped}}
    for t in range(horizon):
        for name, (stream, step) in stepped.items():
            out[name].append(codec.decode(step(stream, step_actions[:, t], real_latents[:, t]), as_uint8=True).cpu())
        out["open_loop"].append(session.step(actions[:, context - 1 + t]).frames)
    return {name: torch.stack(frames_, dim=1) for name, frames_ in out.items()}


def _frame_psnr(reference: torch.Tensor, prediction: torch.Tensor) -> np.ndarray:
    """Per-frame PSNR of uint8 (B, H, ...) frames -> (B, H) float64."""

    B, H = reference.shape[:2]
    return psnr(reference.flatten(0, 1), prediction.flatten(0, 1)).double().reshape(B, H).numpy()


def _frame_sharpness(frames: torch.Tensor) -> np.ndarray:
    """Sharpness of uint8 (B, H, ...) frames -> (B, H) float64."""
    B, H = frames.shape[:2]
    return sharpness(frames.flatten(0, 1)).reshape(B, H).numpy()


@torch.no_grad()
def score_windows(model, codec, frames: np.ndarray, actions: np.ndarray, context: int,
                  sampler_steps: int, seeds: list[int], sampler: dict | None = None,
                  pathways: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """PSNR and sharpness, each (B, H) per window and target step, for each of the predictions
    (module doc). The sharpness dict also holds the real targets' own ("real"); the copy baselines
    are real frames and get none."""
    predicted = predict_windows(model, codec, frames, actions, context, sampler_steps, seeds, sampler, pathways)
    device = codec.latent_mean.device
    targets = torch.as_tensor(frames[:, context:])  # (B, H, H, W, 3)
    ceiling = codec.decode(codec.encode(targets.to(device)), as_uint8=True).cpu()
    last = torch.as_tensor(frames[:, context - 1 : context]).expand_as(targets)
    previous = torch.as_tensor(frames[:, context - 1 : -1])  # the real frame before each target
    modelled = {**predicted, "codec": ceiling}
    psnr_ = {
        **{name: _frame_psnr(targets, frames_) for name, frames_ in modelled.items()},
        "copy_last": _frame_psnr(targets, last),
        "copy_previous": _frame_psnr(targets, previous),
    }
    sharp = {"real": _frame_sharpness(targets), **{name: _frame_sharpness(f) for name, f in modelled.items()}}
    return psnr_, sharp


# ------------------------------------------------------------------------------ the evaluation
def _summary(per_window: np.ndarray, horizon: int) -> dict[str, Any]:
    """(N, H) PSNRs -> the mean curve, the mean over steps, its standard error over windows, and
    the values at the reported steps."""
    curve = per_window.mean(axis=0)
    window_means = per_window.mean(axis=1)
    # One window has no spread to measure: None (JSON null) rather than NaN, which JSON lacks.
    sem = float(window_means.std(ddof=1) / np.sqrt(len(window_means))) if len(window_means) > 1 else None
    return {"mean": float(window_means.mean()), "sem": sem, **_curve_fields(curve, horizon)}


def _curve_fields(curve: np.ndarray, horizon: int) -> dict[str, Any]:
    """A per-step curve as the results keep it: its values at the reported steps (with the horizon
    itself) and the whole curve."""
    steps = sorted({t for t in (*REPORTED_STEPS, horizon) if t <= horizon})
    return {"at": {str(t): float(curve[t - 1]) for t in steps}, "curve": [float(x) for x in curve]}


def _sharpness_summary(per_window: np.ndarray, real: np.ndarray, horizon: int) -> dict[str, Any]:
    """(N, H) sharpness of predictions and of the real targets -> the share of the real frames'
    per step (ratio of the means over windows), over all steps, and at the reported steps."""
    curve = per_window.mean(axis=0) / real.mean(axis=0)
    return {"mean": float(per_window.mean() / real.mean()), **_curve_fields(curve, horizon)}


def evaluate_prediction(cfg: PredictionEvalConfig, progress: bool = False) -> dict[str, Any]:
    """Run the evaluation the config describes (module doc); a JSON-able dict of results."""

    cfg.validate()
    store = EpisodeStore(cfg.dataset)
    windows, short = choose_windows(store.episode_steps, cfg)  # fails fast, before loading a model
    device = resolve_device(cfg.device)
    model, codec = load_dream_model(cfg.checkpoint, cfg.codec, device=device)
    model.eval()
    codec.eval()
    check_compatible(store, model, codec)

    length = cfg.context + cfg.horizon
    scores: dict[str, list[np.ndarray]] = {}
    sharp: dict[str, list[np.ndarray]] = {}
    start = time.perf_counter()
    bar = tqdm(total=len(windows), desc="eval prediction", unit="window", disable=not progress, dynamic_ncols=True)
    try:
        for i in range(0, len(windows), cfg.batch_size):
            chunk = windows[i : i + cfg.batch_size]
            frames, actions = read_windows(store, chunk, length)
            psnr_chunk, sharp_chunk = score_windows(model, codec, frames, actions, cfg.context, cfg.sampler_steps,
                                                    [w.seed for w in chunk], cfg.sampler, cfg.pathways)
            for into, chunk_scores in ((scores, psnr_chunk), (sharp, sharp_chunk)):
                for name, value in chunk_scores.items():
                    into.setdefault(name, []).append(value)
            bar.update(len(chunk))
    finally:
        bar.close()
        store.close()
    seconds = time.perf_counter() - start
    psnr = {name: _summary(np.concatenate(parts), cfg.horizon) for name, parts in scores.items()}
    real = np.concatenate(sharp.pop("real"))
    sharpness_ = {name: _sharpness_summary(np.concatenate(parts), real, cfg.horizon) for name, parts in sharp.items()}
    return {
        "config": asdict(cfg),
        "device": str(device),
        "windows": len(windows),
        "episodes": len({w.episode for w in windows}),
        "episodes_too_short": short,
        "starts": [[w.episode, w.start] for w in windows],
        "psnr": psnr,
        "sharpness": sharpness_,
        "sharpness_real": float(real.mean()),
        "seconds": seconds,
        "predicted_frames_per_s": (4 if cfg.pathways else 2) * len(windows) * cfg.horizon / seconds,
    }


PLOTTED = (
    ("1-step (teacher-forced)", "teacher_forced", "-o"),
    ("open loop", "open_loop", "-o"),
    ("open loop, real direct path", "real_direct_path", "-."),
    ("open loop, real backbone", "real_backbone", "-."),
    ("codec ceiling", "codec", "--"),
    ("copy last context frame", "copy_last", ":"),
    ("copy previous real frame", "copy_previous", ":"),
)


def write_plot(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """`prediction.json` (the results) and `prediction.png` (mean PSNR, and beside it sharpness,
    against the step t = 1..H, one line per prediction and baseline) in `out_dir`; returns
    {"json": path, "plot": path} and records both paths in `results` (which `format_table` then
    lists)."""
    import matplotlib  # optional (docs/architecture.md); also pyplot must load after use("Agg")

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt  # after use("Agg") above


    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "prediction.json", "plot": out / "prediction.png"}
    cfg, psnr = results["config"], results["psnr"]
    sharp = results.get("sharpness")
    fig, axes = plt.subplots(1, 2 if sharp else 1, figsize=(12 if sharp else 7, 4), squeeze=False)
    panels = [(axes[0, 0], psnr, "PSNR (dB)")]
    if sharp:
        panels.append((axes[0, 1], sharp, "sharpness / real frames'"))
    for ax, scores, ylabel in panels:
        for label, key, style in PLOTTED:
            if key in scores:
                curve = scores[key]["curve"]
                ax.plot(range(1, len(curve) + 1), curve, style, label=label)
        ax.set_xlabel("step after the context (t)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{Path(str(cfg['dataset'])).name}: {results['windows']} windows, context {cfg['context']}, "
                 f"{cfg['sampler_steps']} sampler steps", fontsize=9)
    fig.tight_layout()
    tmp = out / ".prediction.png.tmp"
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(paths["plot"])
    results.update({name: str(path) for name, path in paths.items()})
    atomic_write_bytes(paths["json"], json.dumps(results, indent=2, allow_nan=False).encode())
    return paths


TABLE_ROWS = (
    ("codec ceiling", "codec"),
    ("1-step (teacher-forced)", "teacher_forced"),
    ("open loop", "open_loop"),
    ("open loop, real direct path", "real_direct_path"),
    ("open loop, real backbone", "real_backbone"),
    ("copy last context frame", "copy_last"),
    ("copy previous real frame", "copy_previous"),
)


def format_table(results: dict[str, Any]) -> str:
    cfg, psnr = results["config"], results["psnr"]
    steps = list(psnr["open_loop"]["at"])
    short = results["episodes_too_short"]
    lines = [
        f"Prediction PSNR (dB) on {cfg['dataset']}: {results['windows']} windows from {results['episodes']} episodes "
        f"(context {cfg['context']}, horizon {cfg['horizon']}, {cfg['sampler_steps']} sampler steps"
        f"{' ' + str(cfg['sampler']) if cfg.get('sampler') else ''}, seed {cfg['seed']})",
    ]
    if short:
        lines.append(f"  skipped {len(short)} episodes shorter than context + horizon: {short[:10]}{' ...' if len(short) > 10 else ''}")
    head = "".join(f"{'t=' + t:>8}" for t in steps)
    lines.append(f"  {'':<28}{head}{'mean':>8}{'± sem':>8}")
    for label, key in (row for row in TABLE_ROWS if row[1] in psnr):
        s = psnr[key]
        cells = "".join(f"{s['at'][t]:>8.2f}" for t in steps)
        sem = "-" if s["sem"] is None else f"{s['sem']:.2f}"
        lines.append(f"  {label:<28}{cells}{s['mean']:>8.2f}{sem:>8}")
    sharp = results.get("sharpness")  # absent from results written before it was measured
    if sharp:
        lines.append("  sharpness, share of the real targets' image-gradient energy:")
        for label, key in (row for row in TABLE_ROWS if row[1] in sharp):
            s = sharp[key]
            cells = "".join(f"{s['at'][t]:>8.2f}" for t in steps)
            lines.append(f"  {label:<28}{cells}{s['mean']:>8.2f}")
    curve = " ".join(f"{x:.1f}" for x in psnr["open_loop"]["curve"])
    lines += [
        f"  open-loop curve t=1..{cfg['horizon']}: {curve}",
        f"  {results['seconds']:.1f} s on {results['device']} ({results['predicted_frames_per_s']:.1f} predicted frames/s)",
    ]
    lines += [f"  {name}: {results[name]}" for name in ("plot", "json") if name in results]
    return "\n".join(lines)
