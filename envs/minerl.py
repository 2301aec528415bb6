"""A live MineRL environment seen through the same lens as the ingested Minecraft datasets.

`MineRLEnv` wraps a `minerl` gym env (old gym API) as a Gymnasium env whose observations are
(size, size, 3) uint8 frames resized like `worldsim ingest` resizes recordings, and whose actions
are the shared 25-dim encoding of `worldsim.data.minecraft.actions`. A model trained on MineRL,
VPT or TECO data can therefore be compared with, or replace, the real game step for step.

`minerl` needs Java 8 and downloads Minecraft when installed, so it is optional: this module
imports without it, and constructing the env without it raises one ImportError that says so.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from worldsim.data.minecraft import actions
from worldsim.data.minecraft.video import resize_frames
from worldsim.envs.legacy_gym import import_legacy_gym_quietly

MINERL_MISSING = (
    "MineRLEnv needs the `minerl` package (0.4.x with Java 8, or 1.x), which is not installed. "
    "It downloads Minecraft at install time, so it cannot be installed offline; use "
    "`worldsim ingest` to read published MineRL/VPT/TECO recordings instead."
)


class MineRLEnv(gym.Env):
    """Gymnasium adapter for a live MineRL env: frames (size, size, 3), shared action encoding.

    env_id: a registered MineRL id, e.g. 'MineRLTreechop-v0' or 'MineRLBasaltFindCave-v0'.
    Buttons the wrapped env lacks (Treechop has no `use`) and macro actions are ignored there;
    `supported_buttons` lists the ones that act.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, env_id: str = "MineRLTreechop-v0", *, size: int = 64,
                 render_mode: str | None = None) -> None:
        try:
            import_legacy_gym_quietly()  # minerl registers its envs with the old `gym` package
            import gym as old_gym  # after import_legacy_gym_quietly(): at the top, gym would print its notice
            import minerl  # noqa: F401  (importing registers the MineRL ids)
        except ImportError:
            raise ImportError(MINERL_MISSING) from None
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.env_id = env_id
        self.size = size
        self.render_mode = render_mode
        self._env = old_gym.make(env_id)
        self._noop: dict[str, Any] = dict(self._env.action_space.noop())
        self.supported_buttons = tuple(b for b in actions.BUTTONS if b in self._noop)
        self.observation_space = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
        self.action_space = actions.action_space()
        self._frame: np.ndarray | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if options:
            raise ValueError(f"MineRLEnv.reset takes no options, got {sorted(options)}")
        if getattr(self, "_closed", False):
            raise RuntimeError("MineRLEnv is closed: make a new env (step / reset after close() are refused)")
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(seed)
        out = self._env.reset()
        obs = out[0] if isinstance(out, tuple) else out  # old gym: obs; newer: (obs, info)
        return self._observe(obs), {}

    def step(self, action: np.ndarray):
        if getattr(self, "_closed", False):
            raise RuntimeError("MineRLEnv is closed: make a new env (step / reset after close() are refused)")
        minerl_action = actions.to_minerl_action(action, self._noop)
        out = self._env.step(minerl_action)
        if len(out) == 5:
            obs, reward, terminated, truncated, info = out
        else:  # old gym API: one `done`; a time limit says so in the info
            obs, reward, done, info = out
            truncated = bool(info.get("TimeLimit.truncated", False))
            terminated = bool(done) and not truncated
        return self._observe(obs), float(reward), bool(terminated), bool(truncated), dict(info)

    def render(self) -> np.ndarray | None:
        return None if self._frame is None else self._frame.copy()

    def close(self) -> None:
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()
        self._closed = True

    def _observe(self, obs: dict[str, Any]) -> np.ndarray:
        pov = np.asarray(obs["pov"], np.uint8)
        self._frame = resize_frames(pov[None], self.size)[0]
        return self._frame
