"""`worldsim dream`: roll a trained world model out from real context and write the video.

    result = dream(DreamConfig(checkpoint="runs/wm", steps=200, out="dream.mp4"))

1. Context: `context_frames` real frames and the actions between them. "memory-maze" runs the
   live Memory Maze env (reset with `seed`, driven by the policy); anything else is a Minari
   dataset id or path, from which a random clip is drawn.
2. The dream: a `RolloutSession` prefilled with the context, then `steps` frames, each from the
   policy's action. With the live env, the SAME action also steps the real env, which simply
   continues from where the context left it (equivalently: reset with the same seed and replay
   the context actions), so the two can be compared frame by frame.
3. The video: real | dream side by side (real on the left) when a real env is available, else
   the dream alone, each panel labelled "real" / "dream" in its top-left corner; frame 0 is the
   last context frame (the dream side shows it as the codec reconstructs it), then one frame per step. Upscaled by `scale` (nearest neighbour) so 64x64 frames are visible.

Policies act on the frame they would see in use: during the context the real frame, afterwards
the dream frame. "random" is a random walk with persistence (data.exploration.RandomWalk);
"scripted" is the maze navigator, which plans on the REAL maze's layout and pose, so it needs the
live env; an agent run or checkpoint folder of `worldsim agent train` (safetensors + JSON, no
pickles) or a path to a Stable-Baselines3 .zip (pickled objects: load only agents you trust)
loads that agent, which then acts deterministically (its argmax action).

Bad arguments (a checkpoint, dataset or policy that is not there, steps < 1...) raise ValueError /
FileNotFoundError with one line naming the option, before the model is loaded.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import torch

from worldsim.agents.agent_checkpoint import check_spaces
from worldsim.bundled import bundle_location, bundled_model_dir, check_maze_size
from worldsim.data.exploration import Navigator, RandomWalk
from worldsim.envs.memory_maze import MemoryMazeEnv
from worldsim.loading import BUNDLED, load_dream_model
from worldsim.rollout.context import MinariContext
from worldsim.rollout.session import RolloutSession
from worldsim.utils.labels import label_panels

MEMORY_MAZE = "memory-maze"
NO_MODEL_HELP = (
    "no world model to dream with: pass --checkpoint <world-model run or checkpoint folder> "
    "(and --codec <codec checkpoint> if the checkpoint's recorded codec path moved). No bundled "
    "model is installed ({where}). Train one on this machine:\n"
    "  worldsim collect --env-id worldsim/MemoryMaze-9x9-v0 --policy mixed --episodes 20 --workers 2 "
    "--dataset-id worldsim/mm9-v0\n"
    "  worldsim train-codec worldsim/mm9-v0 --out runs/codec\n"
    "  worldsim train --dataset worldsim/mm9-v0 --codec runs/codec --run-dir runs/wm\n"
    "then: worldsim dream --checkpoint runs/wm"
)
VIDEO_SUFFIXES = (".mp4", ".gif")


class NoModelError(FileNotFoundError):
    """No checkpoint given and no bundled model installed."""


@dataclass
class DreamConfig:
    checkpoint: str | None = None
    """World-model run, checkpoint or bundle folder; None or "bundled" uses the bundled model (error if there is none)."""
    codec: str | None = None
    """Codec checkpoint; None uses the one the world model records."""
    context: str = MEMORY_MAZE
    """"memory-maze" (the live env, side-by-side video) or a Minari dataset id / path."""
    maze_size: int = 9
    """Memory Maze size for the live context."""
    context_frames: int = 9
    """Real frames prefilled before dreaming (>= the model's attention window keeps it in-distribution)."""
    policy: str = "random"
    """"random", "scripted" (live maze only), an agent run / checkpoint folder (`worldsim agent train`)
    or a path to a Stable-Baselines3 .zip."""
    steps: int = 100
    """Frames to dream."""
    out: str = "dream.mp4"
    """Video file: .mp4 or .gif."""
    seed: int = 0
    """Fixes the context (env reset / clip), the policy and the sampler noise."""
    sampler_steps: int = 2
    """Denoiser calls per frame."""
    fps: int = 8
    """Playback rate of the video."""
    scale: int = 4
    """Integer upscale of the 64x64 frames in the video."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu" or "cuda"."""
    threads: int | None = 1
    """torch CPU threads while dreaming (the caller's setting is restored after); None keeps it. One
    stream's ops are too small to share out: on 2 cores, 1 thread dreamed 22 fps, 2 threads 16-19."""


@dataclass
class DreamResult:
    out: Path
    frames: int
    """Video frames written (steps + 1)."""
    width: int
    height: int
    side_by_side: bool
    fps: float
    """Dreamed frames per second (model steps only: no policy, real env or video time)."""
    latency_ms: dict[str, float]
    """Per-step latency: median, p90, max."""
    state_bytes: int
    total_reward: float
    """Sum of the model's predicted rewards."""
    terminated_at: int | None
    """First step whose termination logit was > 0 (the rollout continues past it), or None."""
    real_total_reward: float | None = None


# ------------------------------------------------------------------------------ model
def resolve_checkpoint_arg(checkpoint: str | os.PathLike | None, maze_size: int | None = None) -> Path:
    """The checkpoint given (FileNotFoundError when nothing is there), else (None or "bundled") the
    bundled model (`worldsim.bundled`), else NoModelError.

    With the bundled model and a live maze of `maze_size`, the size must be the one it learned."""
    if checkpoint is not None and str(checkpoint) != BUNDLED:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file or folder")
        return path
    found = bundled_model_dir()
    if found is None:
        raise NoModelError(NO_MODEL_HELP.format(where=f"looked in {bundle_location()}"))
    if maze_size is not None:
        check_maze_size(found, maze_size)
    return found


# ------------------------------------------------------------------------------ policies
class Policy(Protocol):
    def reset(self, env, info: dict[str, Any], rng: np.random.Generator) -> None: ...

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int: ...


class SB3Policy:
    """A Stable-Baselines3 agent as a policy: deterministic actions from the frame it sees."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.agent = load_sb3_agent(path)

    def reset(self, env, info: dict[str, Any], rng: np.random.Generator) -> None:
        pass

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int:
        action, _ = self.agent.predict(obs, deterministic=True)
        return int(np.asarray(action).reshape(()))


def load_sb3_agent(path: str | os.PathLike):
    """The agent in an SB3 zip. The zip does not name its algorithm, so the discrete-action ones
    are tried in turn: loading into the wrong class fails on its parameter names."""
    try:  # here: stable-baselines3 is an optional extra (worldsim[rl])
        from stable_baselines3 import A2C, DQN, PPO  # optional: the [rl] extra
    except ImportError:
        raise ImportError("an SB3 policy needs stable-baselines3: pip install 'worldsim[rl]'") from None
    errors = []
    for algo in (PPO, A2C, DQN):
        try:
            return algo.load(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(f"{algo.__name__}: {type(e).__name__}: {str(e)[:200]}")
    raise ValueError(f"{path}: not a PPO, A2C or DQN zip Stable-Baselines3 can load:\n  " + "\n  ".join(errors))


class AgentCheckpointPolicy:
    """An agent of `worldsim agent train` (run or checkpoint folder) as a policy: its deterministic
    action for the frame it sees. No pickle is read."""

    def __init__(self, path: str | os.PathLike) -> None:
        try:  # here: loading an agent needs stable-baselines3, an optional extra (worldsim[rl])
            from worldsim.agents.agent_eval import load_agent  # optional: imports stable-baselines3 (the [rl] extra)
        except ImportError:
            raise ImportError("an agent policy needs stable-baselines3: pip install 'worldsim[rl]'") from None
        self.path = path
        self.agent = load_agent(path)

    def check_fits(self, n_actions: int) -> None:
        """ValueError naming both sides when the agent was trained on other frames or actions."""
        frames = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        check_spaces(self.agent.meta, frames, gym.spaces.Discrete(n_actions), f"--policy {self.path}")

    def reset(self, env, info: dict[str, Any], rng: np.random.Generator) -> None:
        pass

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int:
        return int(np.asarray(self.agent.predict(obs, deterministic=True)).reshape(()))


def is_agent_checkpoint(path: str | os.PathLike) -> bool:
    """A `worldsim agent train` run folder (latest.json) or checkpoint folder (agent.json)."""
    folder = Path(path).expanduser()
    return folder.is_dir() and ((folder / "agent.json").is_file() or (folder / "latest.json").is_file())


def make_policy(name: str, live_env: bool) -> Policy:
    if name == "random":
        return RandomWalk()
    if name == "scripted":
        if not live_env:
            raise ValueError("--policy scripted plans on the real maze's layout and pose, so it needs "
                             f"--context {MEMORY_MAZE}; with a dataset context use --policy random or an SB3 zip")
        return Navigator()
    if name.endswith(".zip"):
        if not Path(name).expanduser().is_file():
            raise FileNotFoundError(f"--policy {name}: no such file")
        return SB3Policy(name)
    if is_agent_checkpoint(name):
        return AgentCheckpointPolicy(name)
    if Path(name).expanduser().is_dir():
        raise ValueError(f"--policy {name}: not an agent folder of `worldsim agent train` (no agent.json or latest.json)")
    if Path(name).suffix or "/" in name or os.sep in name:
        raise FileNotFoundError(f"--policy {name}: no such file or folder")
    raise ValueError("--policy must be random, scripted, an agent folder of `worldsim agent train` or a "
                     f"Stable-Baselines3 .zip, got {name!r}")


class _SpaceOnly:
    """What RandomWalk.reset needs from an env when there is no real one: its action space."""

    def __init__(self, action_space) -> None:
        self.action_space = action_space


# ------------------------------------------------------------------------------ context
def live_context(env, policy: Policy, n_frames: int, seed: int, rng: np.random.Generator):
    """Reset the real env with `seed` and let the policy drive it for n_frames - 1 steps."""
    obs, info = env.reset(seed=seed)
    policy.reset(env, info, rng)
    frames, actions = [obs], []
    for _ in range(n_frames - 1):
        a = policy.act(obs, info)
        obs, _, _, _, info = env.step(a)
        frames.append(obs)
        actions.append(a)
    return np.stack(frames), np.asarray(actions, dtype=np.int64), obs, info


# ------------------------------------------------------------------------------ video
class VideoWriter:
    """Frames appended one by one into a temporary file beside `path`, renamed on close, so a
    crash never leaves a truncated video under the final name."""

    def __init__(self, path: Path, fps: int) -> None:
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(f"--out must end in .mp4 or .gif, got {path.name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # keeps the format suffix
        if path.suffix.lower() == ".gif":
            self._writer = imageio.get_writer(self.tmp, mode="I", duration=1000.0 / fps, loop=0)
        else:
            # macro_block_size=1: no silent resize; frame sides are even (64 * scale, doubled).
            self._writer = imageio.get_writer(self.tmp, fps=fps, codec="libx264", quality=8,
                                              macro_block_size=1, ffmpeg_log_level="error")
        self.frames = 0

    def append(self, frame: np.ndarray) -> None:
        self._writer.append_data(frame)
        self.frames += 1

    def close(self) -> None:
        self._writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def compose(dream_frame: np.ndarray, real_frame: np.ndarray | None, scale: int) -> np.ndarray:
    """(H, W, 3) dream, optional real -> real | dream, upscaled by `scale` (nearest neighbour),
    each panel labelled ("real" / "dream") in its top-left corner (worldsim.utils.labels)."""
    frame = dream_frame if real_frame is None else np.concatenate([real_frame, dream_frame], axis=1)
    frame = np.ascontiguousarray(frame.repeat(scale, axis=0).repeat(scale, axis=1))
    return label_panels(frame, ["dream"] if real_frame is None else ["real", "dream"])


# ------------------------------------------------------------------------------ the rollout
def dream(cfg: DreamConfig, progress: bool = False) -> DreamResult:
    """Run the dream the config describes; see the module doc."""
    for name in ("steps", "context_frames", "scale", "fps", "sampler_steps", "threads"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _dream(cfg, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _dream(cfg: DreamConfig, progress: bool) -> DreamResult:
    out = Path(cfg.out)
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"--out must end in .mp4 or .gif, got {out.name}")
    live = cfg.context == MEMORY_MAZE
    checkpoint = resolve_checkpoint_arg(cfg.checkpoint, cfg.maze_size if live else None)
    if cfg.codec is not None and not Path(cfg.codec).expanduser().exists():
        raise FileNotFoundError(f"--codec {cfg.codec}: no such file or folder")
    # Before loading anything: bad arguments fail fast.
    clip_source = None
    if not live:
        try:
            clip_source = MinariContext(cfg.context, cfg.context_frames)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--context {cfg.context}: {e}") from None
        except ValueError as e:
            raise ValueError(f"--context {cfg.context}: not {MEMORY_MAZE} nor a usable Minari dataset ({e})") from None
    policy = make_policy(cfg.policy, live)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    model, codec = load_dream_model(checkpoint, cfg.codec, device=device)
    if model.cfg.action_kind != "discrete":
        raise ValueError("worldsim dream drives discrete-action models (Memory Maze); this checkpoint "
                         f"takes continuous actions of width {model.cfg.action_dim}")
    if isinstance(policy, AgentCheckpointPolicy):
        policy.check_fits(model.cfg.n_actions)
    rng = np.random.default_rng(cfg.seed)

    real_env, info = None, {}
    if live:
        real_env = MemoryMazeEnv(size=cfg.maze_size)
        if real_env.action_space.n != model.cfg.n_actions:
            raise ValueError(f"the model takes {model.cfg.n_actions} actions, Memory Maze has {real_env.action_space.n}")
        frames, actions, real_obs, info = live_context(real_env, policy, cfg.context_frames, cfg.seed, rng)
    else:
        frames, actions = clip_source.sample(rng, cfg.context_frames)
        real_obs = None
        policy.reset(_SpaceOnly(gym.spaces.Discrete(model.cfg.n_actions)), info, rng)

    session = RolloutSession(model, codec, batch=1, sampler_steps=cfg.sampler_steps)
    obs = session.reset(np.asarray(frames)[None], np.asarray(actions)[None],
                        seeds=[int(rng.integers(2**63 - 1))])[0].numpy()
    writer = VideoWriter(out, cfg.fps)
    latencies, total_reward, real_reward, terminated_at = [], 0.0, 0.0, None
    try:
        writer.append(compose(obs, real_obs, cfg.scale))
        for t in range(cfg.steps):
            a = policy.act(obs, info)
            start = time.perf_counter()
            step = session.step(np.asarray([a]))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            latencies.append(time.perf_counter() - start)
            obs = step.frames[0].numpy()
            total_reward += float(step.rewards[0])
            if terminated_at is None and bool(step.terminated[0]):
                terminated_at = t + 1
            if real_env is not None:
                real_obs, r, _, _, info = real_env.step(a)
                real_reward += r
            writer.append(compose(obs, real_obs, cfg.scale))
            if progress and (t + 1) % max(1, cfg.steps // 10) == 0:
                print(f"  dreamed {t + 1}/{cfg.steps} frames", flush=True)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if real_env is not None:
            real_env.close()
    ms = sorted(1e3 * x for x in latencies)
    h, w = obs.shape[:2]
    return DreamResult(
        out=out, frames=writer.frames, width=(w * (2 if live else 1)) * cfg.scale, height=h * cfg.scale,
        side_by_side=live, fps=len(latencies) / sum(latencies),
        latency_ms={"median": statistics.median(ms), "p90": ms[min(len(ms) - 1, int(0.9 * len(ms)))], "max": ms[-1]},
        state_bytes=session.state_nbytes(), total_reward=total_reward, terminated_at=terminated_at,
        real_total_reward=real_reward if live else None,
    )


def format_result(r: DreamResult) -> str:
    layout = "real | dream side by side" if r.side_by_side else "dream only (no real env for this context)"
    lines = [
        f"wrote {r.out} ({r.frames} frames, {r.width}x{r.height}, {layout})",
        f"dream: {r.fps:.1f} fps, per-step latency median {r.latency_ms['median']:.1f} ms, "
        f"p90 {r.latency_ms['p90']:.1f} ms, max {r.latency_ms['max']:.1f} ms; state {r.state_bytes / 2**20:.2f} MiB",
        f"predicted reward {r.total_reward:.2f}" + ("" if r.real_total_reward is None else f", real env reward {r.real_total_reward:.2f}")
        + ("" if r.terminated_at is None else f"; the model predicted termination at step {r.terminated_at}"),
    ]
    return "\n".join(lines)
