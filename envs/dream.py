"""Dream environments: the world model as a Gymnasium env (DIAMOND's world-model env, streaming).

`DreamEnv` starts each episode from REAL context frames (a `ContextSource`: a clip of a Minari
dataset, or frames from the live Memory Maze env), then every `step` dreams the next frame with a
`RolloutSession`. Observation: the decoded frame, (64, 64, 3) uint8. Reward and termination come
from the model's heads (termination: logit > 0); truncation after `horizon` dreamed steps.
Seeding: `reset(seed=...)` seeds `self.np_random`, which picks the context and seeds the sampler's
noise, so a seed fixes the whole episode.

Bad input (wrong shape, dtype or range, NaN) raises before anything changes, so the env stays
usable; stepping a finished episode needs `reset` first; a closed env refuses to step or reset, and
`reset` refuses options it does not know (it knows none).

Checkpoints: a world-model run or checkpoint folder, a bundle folder, or None / "bundled" for the
bundled model. Made through `gymnasium.make`, episodes end at the registered `max_episode_steps`
(the real maze's episode length, 1000 for 9x9; `gymnasium.make(id, max_episode_steps=N)` changes it).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from worldsim.envs.human_render import HumanRenderWindow, render_frame
from worldsim.envs.memory_maze import MemoryMazeEnv
from worldsim.loading import (  # noqa: F401 (re-exported: the envs' model loading, as before)
    BUNDLED,
    NO_MODEL_HELP,
    default_checkpoint,
    load_dream_model,
    resolve_dream_checkpoint,
)
from worldsim.rollout.context import ClipContext, ContextSource, MinariContext, check_clip  # noqa: F401 (re-exported)
from worldsim.rollout.session import RolloutSession

FRAME_SHAPE = (64, 64, 3)
RENDER_FPS = 4  # Memory Maze's control rate; the dream runs at the same "speed" in human mode
SEED_BOUND = 2**63 - 1


# ------------------------------------------------------------------------------ context sources
class MemoryMazeContext:
    """Frames of the live Memory Maze env: a seeded reset, then uniformly random actions.

    `env`: the Memory Maze to use, default a new `MemoryMazeEnv(size)` in this process. A process
    with a pygame window of its own (the viewer) passes one in a worker process instead,
    `SubprocessEnv(MemoryMazeEnv, size=..., render_mode="rgb_array")`: MuJoCo's OpenGL and the
    window break each other in one process (envs/subprocess_env.py)."""

    def __init__(self, size: int = 9, env: gym.Env | None = None) -> None:
        self.env = env if env is not None else MemoryMazeEnv(size=size)

    def sample(self, rng: np.random.Generator, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
        obs, _ = self.env.reset(seed=int(rng.integers(2**31 - 1)))
        frames, actions = [obs], []
        for _ in range(n_frames - 1):
            a = int(rng.integers(self.env.action_space.n))
            obs, *_ = self.env.step(a)
            frames.append(obs)
            actions.append(a)
        return np.stack(frames), np.asarray(actions, dtype=np.int64)

    def close(self) -> None:
        self.env.close()


# ------------------------------------------------------------------------------ spaces, actions
def action_space_for(cfg, low: float = -1.0, high: float = 1.0) -> gym.Space:
    """Discrete(n_actions), or Box(low, high, (action_dim,)) for continuous models."""
    if cfg.action_kind == "discrete":
        return gym.spaces.Discrete(cfg.n_actions)
    return gym.spaces.Box(low, high, (cfg.action_dim,), np.float32)


def check_action(space: gym.Space, action: Any) -> np.ndarray:
    """One action as an array, or a ValueError / TypeError saying what is wrong with it."""
    a = np.asarray(action)
    if isinstance(space, gym.spaces.Discrete):
        if a.shape != () or a.dtype.kind not in "iu":
            raise TypeError(f"action must be one integer in [0, {space.n}), got {action!r} "
                            f"(dtype {a.dtype}, shape {a.shape})")
        if not space.contains(a.astype(np.int64)):
            raise ValueError(f"action {int(a)} out of range [0, {space.n})")
        return a.astype(np.int64)
    if a.dtype.kind != "f":
        raise TypeError(f"action must be floats, got dtype {a.dtype}")
    if a.shape != space.shape:
        raise ValueError(f"action must have shape {space.shape}, got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"action contains NaN or inf: {a}")
    if (a < space.low).any() or (a > space.high).any():
        raise ValueError(f"action {a} outside [{space.low}, {space.high}]")
    return a.astype(np.float32)


def check_reset_options(owner: str, options: dict | None, known: Sequence[str] = ()) -> None:
    """ValueError naming the unknown keys and the known ones; None and {} pass."""
    if not options:
        return
    if not isinstance(options, dict):
        raise TypeError(f"{owner}.reset options must be a dict, got {type(options).__name__}")
    unknown = sorted(str(k) for k in options if k not in known)
    if unknown:
        raise ValueError(f"{owner}.reset got unknown options {unknown}; known options: "
                         + (", ".join(known) if known else "none"))


def closed_error(owner: str) -> RuntimeError:
    return RuntimeError(f"{owner} is closed: make a new env (step / reset after close() are refused)")


# ------------------------------------------------------------------------------ the env
class DreamEnv(gym.Env):
    """One dream stream; see the module doc. `context_frames` real frames are prefilled per reset."""

    metadata = {"render_modes": ["rgb_array", "human"], "render_fps": RENDER_FPS}

    def __init__(
        self,
        *,
        model,
        codec,
        context: ContextSource,
        context_frames: int = 9,
        horizon: int | None = 1000,
        sampler_steps: int = 2,
        render_mode: str | None = None,
        action_low: float = -1.0,
        action_high: float = 1.0,
    ) -> None:
        """horizon: dreamed steps before the env truncates itself; None: never (a `TimeLimit`
        wrapper, as `gymnasium.make` adds, ends the episodes)."""
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        if context_frames < 1 or (horizon is not None and horizon < 1):
            raise ValueError(f"context_frames and horizon must be >= 1, got {context_frames}, {horizon}")
        self.context = context
        self.context_frames = context_frames
        self.horizon = horizon
        self.render_mode = render_mode
        self.session = RolloutSession(model, codec, batch=1, sampler_steps=sampler_steps)
        self.observation_space = gym.spaces.Box(0, 255, FRAME_SHAPE, np.uint8)
        self.action_space = action_space_for(model.cfg, action_low, action_high)
        self._frame: np.ndarray | None = None
        self._t = 0
        self._done = True
        self._window = None
        self._closed = False
        self._owned_context = False  # closed with the env (set by make_dream_env when it made it)

    @classmethod
    def from_checkpoint(cls, checkpoint, codec=None, **kwargs) -> DreamEnv:
        model, codec_model = load_dream_model(checkpoint, codec)
        return cls(model=model, codec=codec_model, **kwargs)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if self._closed:
            raise closed_error(type(self).__name__)
        check_reset_options(type(self).__name__, options)
        super().reset(seed=seed)
        frames, actions = self.context.sample(self.np_random, self.context_frames)
        check_clip(np.asarray(frames), np.asarray(actions), self.context_frames, type(self.context).__name__)
        obs = self.session.reset(np.asarray(frames)[None], np.asarray(actions)[None],
                                 seeds=[int(self.np_random.integers(SEED_BOUND))])
        self._frame = obs[0].numpy()
        self._t, self._done = 0, False
        if self.render_mode == "human":
            self.render()
        return self._frame.copy(), {"step": 0}

    def step(self, action):
        if self._closed:
            raise closed_error(type(self).__name__)
        a = check_action(self.action_space, action)  # before anything changes
        if self._done:
            raise RuntimeError("the episode has ended (or never started): call reset() first")
        out = self.session.step(a[None])
        self._frame = out.frames[0].numpy()
        self._t += 1
        terminated = bool(out.terminated[0])
        truncated = self.horizon is not None and self._t >= self.horizon and not terminated
        self._done = terminated or truncated
        if self.render_mode == "human":
            self.render()
        info = {"step": self._t, "termination_logit": float(out.termination_logits[0])}
        return self._frame.copy(), float(out.rewards[0]), terminated, truncated, info

    def render(self):
        if self.render_mode == "human" and self._window is None:
            self._window = HumanRenderWindow("worldsim dream", self.metadata["render_fps"])
        return render_frame("DreamEnv", self.render_mode, self._frame, self._window)

    def close(self) -> None:
        if self._window is not None:
            self._window.close()
            self._window = None
        if self._owned_context and hasattr(self.context, "close"):
            self.context.close()
            self._owned_context = False
        self._closed = True
        self._done = True


def make_context(context: ContextSource | None, dataset, maze_size: int, context_frames: int) -> ContextSource:
    if context is not None:
        return context
    if dataset is not None:
        return MinariContext(dataset, context_frames)
    return MemoryMazeContext(maze_size)


def make_dream_env(
    checkpoint: str | os.PathLike | None = None,
    codec: str | os.PathLike | None = None,
    *,
    dataset=None,
    maze_size: int = 9,
    context: ContextSource | None = None,
    context_frames: int = 9,
    horizon: int | None = None,
    **kwargs,
) -> DreamEnv:
    """Entry point of the registered dream ids. Model: `checkpoint`, else (None or "bundled") the
    bundled model. Context: `context` (e.g. `worldsim.bundled.load_bundle_clips(dir).context()`),
    else a Minari `dataset` (path or list of paths), else the live Memory Maze of `maze_size`.
    horizon: None lets `gymnasium.make`'s TimeLimit (`max_episode_steps`) end the episodes."""
    checkpoint = resolve_dream_checkpoint(checkpoint, maze_size)
    model, codec_model = load_dream_model(checkpoint, codec)
    env = DreamEnv(model=model, codec=codec_model, context=make_context(context, dataset, maze_size, context_frames),
                   context_frames=context_frames, horizon=horizon, **kwargs)
    env._owned_context = context is None
    return env
