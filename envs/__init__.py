"""worldsim's Gymnasium environments. Importing `worldsim.envs` registers their ids:

    gymnasium.make("worldsim/MemoryMaze-9x9-v0")   # also -11x11, -13x13, -15x15
    gymnasium.make("worldsim/Crafter-v0")
    gymnasium.make("worldsim/Dream-MemoryMaze-9x9-v0")          # the learned maze (bundled model)
    worldsim.envs.make_sb3_vec_env("worldsim/Dream-MemoryMaze-9x9-v0", num_envs=4)   # for SB3

Registration only records entry points: the heavy simulators (MuJoCo, crafter) are imported when
an env is made; `make_sb3_vec_env` and `DreamSB3VecEnv` import Stable-Baselines3 on first use.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from worldsim.envs.memory_maze import EPISODE_STEPS, MAZE_SIZES

NAMESPACE = "worldsim"


def _register(name: str, entry_point: str, kwargs: dict[str, Any], max_episode_steps: int) -> str:
    """Register `worldsim/<name>` once (re-importing this module must not re-register)."""
    env_id = f"{NAMESPACE}/{name}"
    if env_id not in gym.registry:
        gym.register(
            id=env_id,
            entry_point=entry_point,
            kwargs=kwargs,
            max_episode_steps=max_episode_steps,
        )
    return env_id


# ------------------------------------------------------------------ real environments
# Memory Maze's own time limit ends episodes after EPISODE_STEPS; registering the same number as
# max_episode_steps makes it visible in env.spec, and `gym.make(..., max_episode_steps=n)` can
# shorten (not lengthen) episodes.
MEMORY_MAZE_IDS = tuple(
    _register(
        f"MemoryMaze-{size}x{size}-v0",
        "worldsim.envs.memory_maze:MemoryMazeEnv",
        {"size": size},
        EPISODE_STEPS[size],
    )
    for size in MAZE_SIZES
)
CRAFTER_ID = _register("Crafter-v0", "worldsim.envs.crafter:CrafterEnv", {}, 10000)

REAL_ENV_IDS: tuple[str, ...] = (*MEMORY_MAZE_IDS, CRAFTER_ID)

# ------------------------------------------------------------------ dream environments
# The learned Memory Maze: `gymnasium.make(id, checkpoint=...)` (a `worldsim train` run or
# checkpoint folder), optionally `codec=`, `dataset=` (Minari context clips instead of the live
# maze), `context_frames`, `horizon`. `gymnasium.make_vec(id, num_envs=N, ...)` builds the native
# batched env (one model call for all sub-envs). checkpoint=None or "bundled": the bundled model.
# Episodes last as long as the real maze's (max_episode_steps: 1000 for 9x9);
# `gymnasium.make(id, max_episode_steps=N)` / `make_vec(id, num_envs, max_episode_steps=N)` change it.
DREAM_MEMORY_MAZE_IDS: tuple[str, ...] = tuple(
    f"{NAMESPACE}/Dream-MemoryMaze-{size}x{size}-v0" for size in MAZE_SIZES
)
for _size, _dream_id in zip(MAZE_SIZES, DREAM_MEMORY_MAZE_IDS):
    if _dream_id not in gym.registry:
        gym.register(
            id=_dream_id,
            entry_point="worldsim.envs.dream:make_dream_env",
            vector_entry_point="worldsim.envs.dream_vector:make_dream_vector_env",
            kwargs={"maze_size": _size},
            max_episode_steps=EPISODE_STEPS[_size],
        )


def __getattr__(name: str) -> Any:
    """`make_sb3_vec_env` and `DreamSB3VecEnv` import Stable-Baselines3 (worldsim[rl]) on first use."""
    if name in ("make_sb3_vec_env", "DreamSB3VecEnv"):
        from worldsim.envs import sb3_vec  # optional: stable-baselines3 (the [rl] extra), and torch

        return getattr(sb3_vec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
