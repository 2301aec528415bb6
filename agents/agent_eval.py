"""Score SB3 agents in the real Memory Maze: fixed seeds, a random baseline on the same mazes.

    agent = load_agent("runs/ppo-dream")                  # a policy rebuilt from safetensors + JSON
    result = compare_with_random(agent, "worldsim/MemoryMaze-9x9-v0", episodes=5, max_steps=200)
    print(format_comparison(result))

Episode i of an evaluation always plays maze seed `seed + i`; a random policy draws its actions
from a generator seeded the same way and an agent's sampled actions are seeded per episode, so
the same call gives the same returns. An agent whose observation or action space is not the
maze's is refused with both spaces named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first
from stable_baselines3.common.vec_env import VecTransposeImage

from worldsim.agents.agent_checkpoint import (
    check_spaces, load_policy_weights, read_agent_meta, resolve_agent, space_from_summary, space_summary,
)
from worldsim.envs import MEMORY_MAZE_IDS
from worldsim.envs.memory_maze import ACTION_NAMES, FRAME_SHAPE

ALGORITHMS: dict[str, type[BaseAlgorithm]] = {"ppo": PPO, "a2c": A2C, "dqn": DQN}


# ------------------------------------------------------------------------------ names
def algorithm_class(name: str) -> type[BaseAlgorithm]:
    try:
        return ALGORITHMS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}") from None


def maze_env_id(env: str | int) -> str:
    """A registered real Memory Maze id from itself or from a maze size (9, 11, 13, 15)."""
    env_id = f"worldsim/MemoryMaze-{env}x{env}-v0" if isinstance(env, int) else env
    if env_id not in MEMORY_MAZE_IDS:
        raise ValueError(f"unknown env {env!r}; agents train and evaluate in one of {list(MEMORY_MAZE_IDS)} "
                         "(or pass the maze size 9, 11, 13 or 15)")
    return env_id


def maze_size(env_id: str) -> int:
    return int(gym.spec(env_id).kwargs["size"])


def real_spaces() -> tuple[gym.Space, gym.Space]:
    """Memory Maze's spaces, known without building the (slow) MuJoCo env."""
    return gym.spaces.Box(0, 255, FRAME_SHAPE, np.uint8), gym.spaces.Discrete(len(ACTION_NAMES))


def policy_observation_space(space: gym.Space) -> gym.Space:
    """The space SB3's policy sees: channel-last images are transposed to channel-first, as SB3's
    algorithms do by wrapping the env in `VecTransposeImage`."""
    if isinstance(space, gym.spaces.Box) and is_image_space(space) and not is_image_space_channels_first(space):
        return VecTransposeImage.transpose_space(space)
    return space


# ------------------------------------------------------------------------------ evaluation
def _episode_stats(returns: list[float], lengths: list[int]) -> dict[str, Any]:
    return {"returns": returns, "lengths": lengths, "mean": float(np.mean(returns)), "std": float(np.std(returns))}


class RealMazeEvaluator:
    """`episodes` episodes of at most `max_steps` in the real maze, episode i on seed `seed + i`.
    One env serves every evaluation; it is built on first use (MuJoCo takes seconds to build),
    unless `maze` hands over one already built (the caller keeps it: `close` leaves it open)."""

    def __init__(self, env: str | int = "worldsim/MemoryMaze-9x9-v0", episodes: int = 5, max_steps: int = 1_000,
                 seed: int = 0, maze: gym.Env | None = None) -> None:
        if episodes < 1 or max_steps < 1:
            raise ValueError(f"episodes and max_steps must be >= 1, got {episodes}, {max_steps}")
        self.env_id = maze_env_id(env)
        self.episodes, self.max_steps, self.seed = episodes, max_steps, seed
        self._env, self._owns_env = maze, maze is None

    @property
    def settings(self) -> dict[str, Any]:
        return {"env_id": self.env_id, "episodes": self.episodes, "max_steps": self.max_steps, "seed": self.seed}

    def run(self, act: Callable[[np.ndarray, int], Any]) -> dict[str, Any]:
        """Play with `act(obs, episode_index) -> action`; returns per episode, mean and std."""
        if self._env is None:
            self._env = gym.make(self.env_id, disable_env_checker=True)
        returns, lengths = [], []
        for i in range(self.episodes):
            obs, _ = self._env.reset(seed=self.seed + i)
            total, t, done = 0.0, 0, False
            while t < self.max_steps and not done:
                obs, reward, terminated, truncated, _ = self._env.step(act(obs, i))
                total, t, done = total + float(reward), t + 1, terminated or truncated
            returns.append(total)
            lengths.append(t)
        return _episode_stats(returns, lengths)

    def random(self) -> dict[str, Any]:
        """Uniform actions, drawn from a generator seeded per episode: same seeds, same returns."""
        rngs = [np.random.default_rng(self.seed + i) for i in range(self.episodes)]
        n_actions = real_spaces()[1].n
        return self.run(lambda obs, i: int(rngs[i].integers(n_actions)))

    def policy(self, policy: BasePolicy, deterministic: bool = False) -> dict[str, Any]:
        """An SB3 policy; its action sampling is seeded per episode without touching the caller's RNG."""
        started: set[int] = set()

        def act(obs: np.ndarray, i: int):
            if i not in started:  # reseed at each episode: results do not depend on episode order
                started.add(i)
                torch.manual_seed(self.seed + i)
            return policy.predict(obs, deterministic=deterministic)[0]

        with torch.random.fork_rng(devices=[] if policy.device.type == "cpu" else None):
            return self.run(act)

    def close(self) -> None:
        if self._env is not None and self._owns_env:
            self._env.close()
        self._env = None


@dataclass
class Agent:
    """A policy rebuilt from an agent checkpoint, with its agent.json."""

    policy: BasePolicy
    meta: dict[str, Any]
    folder: Path | None = None

    def predict(self, obs: np.ndarray, deterministic: bool = False):
        return self.policy.predict(obs, deterministic=deterministic)[0]


def load_agent(path, device: str = "cpu") -> Agent:
    """The policy of an agent checkpoint (or of a run's latest) in eval mode; no pickle is read."""
    folder = resolve_agent(path)
    meta = read_agent_meta(folder)
    algo = algorithm_class(meta["algorithm"])
    if meta["policy"] not in algo.policy_aliases:
        raise ValueError(f"{folder}: unknown policy {meta['policy']!r} for {meta['algorithm']}")
    policy = algo.policy_aliases[meta["policy"]](
        policy_observation_space(space_from_summary(meta["observation_space"])),
        space_from_summary(meta["action_space"]),
        lr_schedule=lambda _: 0.0,  # no training here: the optimizer is built but never stepped
        **meta["policy_kwargs"],
    )
    load_policy_weights(folder, policy, meta)
    policy.set_training_mode(False)
    return Agent(policy.to(device), meta, folder)


def _as_agent(agent) -> Agent:
    if isinstance(agent, Agent):
        return agent
    if isinstance(agent, BaseAlgorithm):  # a model still in memory: describe its spaces as a checkpoint would
        return Agent(agent.policy, {"observation_space": space_summary(agent.observation_space),
                                    "action_space": space_summary(agent.action_space), "transposed": True})
    return load_agent(agent)


def _check_agent_fits(agent: Agent, env_id: str) -> None:
    obs_space, act_space = real_spaces()
    if agent.meta.get("transposed"):  # an in-memory SB3 model reports the image space it transposed
        obs_space = policy_observation_space(obs_space)
    check_spaces(agent.meta, obs_space, act_space, f"agent {agent.folder or 'in memory'} in {env_id}")


def evaluate_agent(agent, env: str | int = "worldsim/MemoryMaze-9x9-v0", episodes: int = 5, max_steps: int = 1_000,
                   seed: int = 0, deterministic: bool = False) -> dict[str, Any]:
    """Returns of an agent (an `Agent`, an SB3 model, or a checkpoint / run folder) in the real maze:
    {"returns", "lengths", "mean", "std"}. ValueError when its spaces are not the maze's."""
    agent = _as_agent(agent)
    evaluator = RealMazeEvaluator(env, episodes, max_steps, seed)
    _check_agent_fits(agent, evaluator.env_id)
    try:
        return evaluator.policy(agent.policy, deterministic)
    finally:
        evaluator.close()


def evaluate_random(env: str | int = "worldsim/MemoryMaze-9x9-v0", episodes: int = 5, max_steps: int = 1_000,
                    seed: int = 0) -> dict[str, Any]:
    """The uniformly random baseline on the same seeds as `evaluate_agent`."""
    evaluator = RealMazeEvaluator(env, episodes, max_steps, seed)
    try:
        return evaluator.random()
    finally:
        evaluator.close()


def compare_with_random(agent, env: str | int = "worldsim/MemoryMaze-9x9-v0", episodes: int = 5,
                        max_steps: int = 1_000, seed: int = 0, deterministic: bool = False) -> dict[str, Any]:
    """{"agent": ..., "random": ..., "settings": ...}: both on the same mazes, one env for both."""
    agent = _as_agent(agent)
    evaluator = RealMazeEvaluator(env, episodes, max_steps, seed)
    _check_agent_fits(agent, evaluator.env_id)
    try:
        scores = {"agent": evaluator.policy(agent.policy, deterministic), "random": evaluator.random()}
    finally:
        evaluator.close()
    trained = agent.meta.get("world", {})
    return {**scores, "settings": {**evaluator.settings, "deterministic": deterministic,
                                   "num_timesteps": agent.meta.get("num_timesteps"), "trained_in": trained.get("kind")}}


def format_comparison(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"{s['env_id']}: {s['episodes']} episode(s) of at most {s['max_steps']} steps, seeds {s['seed']}.."
             f"{s['seed'] + s['episodes'] - 1}",
             f"{'policy':<8} {'mean':>7} {'std':>7}  returns"]
    for name in ("agent", "random"):
        r = result[name]
        lines.append(f"{name:<8} {r['mean']:>7.2f} {r['std']:>7.2f}  {' '.join(f'{x:g}' for x in r['returns'])}")
    return "\n".join(lines)
