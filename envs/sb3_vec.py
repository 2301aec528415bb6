"""Stable-Baselines3 `VecEnv` over `DreamVectorEnv`: SB3's own conventions, no per-env loop.

    from stable_baselines3 import PPO
    from worldsim.envs import make_sb3_vec_env

    vec = make_sb3_vec_env("worldsim/Dream-MemoryMaze-9x9-v0", num_envs=4)   # the bundled model
    PPO("CnnPolicy", vec).learn(10_000)

SB3 expects same-step auto-reset: the step that ends sub-env i returns the first frame of i's next
episode, done[i] = terminated or truncated, info[i]["terminal_observation"] = the last frame, and
info[i]["TimeLimit.truncated"] = truncated and not terminated. The adapter therefore runs the
vector env in SAME_STEP mode and moves its batched `final_obs` into SB3's per-env info dicts.
Seeds: `vec.seed(s)` (SB3) makes the next `reset()` seed sub-env i with s + i.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnv

from worldsim.envs.dream_vector import DreamVectorEnv, make_dream_vector_env


class DreamSB3VecEnv(VecEnv):
    def __init__(self, num_envs: int, **dream_kwargs: Any) -> None:
        """Arguments as `DreamVectorEnv` (model=, codec=, context=, ...), or, without `model`, as
        `make_dream_vector_env` (checkpoint=, codec=, dataset=, maze_size=...: the bundled model and
        the live maze by default). autoreset is SAME_STEP, SB3's convention."""
        if "autoreset_mode" in dream_kwargs:
            raise ValueError("the SB3 adapter sets autoreset_mode itself (SAME_STEP, SB3's convention)")
        if "model" in dream_kwargs:
            self.venv = DreamVectorEnv(num_envs, autoreset_mode=AutoresetMode.SAME_STEP, **dream_kwargs)
        else:
            self.venv = make_dream_vector_env(num_envs, autoreset_mode=AutoresetMode.SAME_STEP, **dream_kwargs)
        super().__init__(num_envs, self.venv.single_observation_space, self.venv.single_action_space)
        self.render_mode = self.venv.render_mode
        self._actions: np.ndarray | None = None

    def seed(self, seed: int | None = None):
        """Seeds for the next reset: sub-env i gets seed + i; seed is a non-negative integer or None."""
        if seed is not None and (isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise TypeError(f"seed must be a non-negative integer or None, got {seed!r}")
        return super().seed(None if seed is None else int(seed))

    def reset(self) -> np.ndarray:
        seeds = self._seeds
        options = next((o for o in self._options if o), None)  # set_options(): refused unless known
        obs, _ = self.venv.reset(seed=None if seeds[0] is None else [int(s) for s in seeds], options=options)
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


def make_sb3_vec_env(env_id: str = "worldsim/Dream-MemoryMaze-9x9-v0", num_envs: int = 1,
                     checkpoint: Any = None, *, seed: int | None = None, monitor: bool = True, **kwargs: Any) -> VecEnv:
    """A Stable-Baselines3 `VecEnv` of `num_envs` copies of a registered worldsim env, in one call.

    Dream ids (`worldsim/Dream-MemoryMaze-*`): one `DreamSB3VecEnv` (every sub-env a row of one
    model batch). checkpoint: a world-model run / checkpoint / bundle folder; None or "bundled":
    the bundled model. kwargs as `make_dream_vector_env` (codec=, dataset=, context=,
    context_frames=, sampler_steps=, horizon= ...); episodes last the id's `max_episode_steps`
    unless horizon= (or max_episode_steps=) says otherwise.
    Real ids (`worldsim/MemoryMaze-*`, `worldsim/Crafter-v0`): SB3's `make_vec_env` (a
    `DummyVecEnv`, kwargs go to `gymnasium.make`); checkpoint must be None.
    monitor: wrap in `VecMonitor` so SB3 logs episode returns and lengths. seed: the next reset's
    seeds (sub-env i: seed + i).
    """
    import worldsim.envs  # noqa: F401 - registers the ids

    if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as e:
        raise ValueError(f"unknown env id {env_id!r} ({e}); worldsim's ids: "
                         + ", ".join((*worldsim.envs.DREAM_MEMORY_MAZE_IDS, *worldsim.envs.REAL_ENV_IDS))) from None
    if spec.id in worldsim.envs.DREAM_MEMORY_MAZE_IDS:
        if "max_episode_steps" not in kwargs and "horizon" not in kwargs:
            kwargs["max_episode_steps"] = spec.max_episode_steps
        vec: VecEnv = DreamSB3VecEnv(int(num_envs), checkpoint=checkpoint, **{**spec.kwargs, **kwargs})
        if monitor:
            vec = VecMonitor(vec)
        if seed is not None:
            vec.seed(seed)
        return vec
    if checkpoint is not None:
        raise ValueError(f"{env_id} is a real env: it takes no world-model checkpoint (pass checkpoint=None)")
    if monitor:  # each env in SB3's Monitor
        return make_vec_env(env_id, n_envs=int(num_envs), seed=seed, env_kwargs=kwargs or None)
    return _plain_dummy(env_id, int(num_envs), seed, kwargs)


def _plain_dummy(env_id: str, num_envs: int, seed: int | None, kwargs: dict[str, Any]) -> VecEnv:
    vec = DummyVecEnv([lambda: gym.make(env_id, **kwargs)] * num_envs)
    if seed is not None:
        vec.seed(seed)
    return vec
