"""Stable-Baselines3 `VecEnv` over `DreamVectorEnv`: SB3's own conventions, no per-env loop.

SB3 expects same-step auto-reset: the step that ends sub-env i returns the first frame of i's next
episode, done[i] = terminated or truncated, info[i]["terminal_observation"] = the last frame, and
info[i]["TimeLimit.truncated"] = truncated and not terminated. The adapter therefore runs the
vector env in SAME_STEP mode and moves its batched `final_obs` into SB3's per-env info dicts.
Seeds: `vec.seed(s)` (SB3) makes the next `reset()` seed sub-env i with s + i.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env.base_vec_env import VecEnv

from worldsim.envs.dream_vector import DreamVectorEnv


class DreamSB3VecEnv(VecEnv):
    def __init__(self, num_envs: int, **dream_kwargs: Any) -> None:
        """Arguments as `DreamVectorEnv` (model, codec, context, ...); autoreset is SAME_STEP."""
        if "autoreset_mode" in dream_kwargs:
            raise ValueError("the SB3 adapter sets autoreset_mode itself (SAME_STEP, SB3's convention)")
        self.venv = DreamVectorEnv(num_envs, autoreset_mode=AutoresetMode.SAME_STEP, **dream_kwargs)
        super().__init__(num_envs, self.venv.single_observation_space, self.venv.single_action_space)
        self.render_mode = self.venv.render_mode
        self._actions: np.ndarray | None = None

    def reset(self) -> np.ndarray:
        seeds = self._seeds
        obs, _ = self.venv.reset(seed=None if seeds[0] is None else [int(s) for s in seeds])
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = [{} for _ in range(self.num_envs)]
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self):
        if self._actions is None:
            raise RuntimeError("step_wait() without step_async()")
        actions, self._actions = self._actions, None
        obs, rewards, terminated, truncated, info = self.venv.step(actions)
        dones = terminated | truncated
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for i in np.flatnonzero(dones):
            infos[i]["terminal_observation"] = info["final_obs"][i]
            infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
        return obs, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self.venv.close()

    def get_images(self):
        return list(self.venv._frames.copy())

    # Sub-envs are rows of one batch, not objects: attributes are the batch's, shared by all.
    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        return [getattr(self.venv, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        if len(list(self._get_indices(indices))) != self.num_envs:
            raise ValueError("dream sub-envs share one batch: set attributes on all of them")
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        raise NotImplementedError(f"dream sub-envs are rows of one batch; there is no per-env {method_name!r}")

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]
