"""Memory Maze (Pasukonis et al., 2022, arXiv 2210.13383) as a Gymnasium environment.

Upstream `memory-maze` 1.0.3 ships only a dm_env API and old-`gym` ids; this adapter wraps the
dm_env task `memory_maze.tasks.memory_maze_{N}x{N}` with `global_observables=True` and exposes
exactly upstream's dynamics, frames and reward.

Observation: the 64x64x3 uint8 first-person image with the current target's colour drawn as a
border (upstream's `TargetColorAsBorderWrapper`).
Actions: Discrete(6), upstream's order, named in `ACTION_NAMES`.
Reward: +1 when the agent touches the current target (then a new target is drawn).
Episodes never terminate; they are truncated by upstream's time limit (`EPISODE_STEPS`).

Coordinates (upstream's global observables, grid-cell units, outer walls removed):
  - `agent_pos`, `target_pos`, `targets_pos[i]` are (x, y) with (0, 0) at the bottom-left corner
    of the inner maze and (N, N) at the top-right; the cell of a position is
    (floor(x), floor(y)).
  - `agent_dir` is the unit heading vector in the same (x, y) axes: moving forward increases
    `agent_pos` along it.
  - `maze_layout[y, x]` (`env.unwrapped.maze_layout`, (N, N) uint8) is 1 for a free floor cell and
    0 for a wall; row 0 is the bottom row (y = 0), so `maze_layout[floor(y), floor(x)]` is the cell
    under a position.

Info (identical keys, shapes and dtypes after `reset` and every `step`, so it can be stored per
step): "agent_pos" float64 (2,), "agent_dir" float64 (2,), "target_color" float64 (3,) in [0, 1],
"target_pos" float64 (2,), "targets_pos" float64 (n_targets, 2), "target_index" int64 scalar
(row of `targets_pos` that is the current goal).

Seeding: `reset(seed=s)` reseeds the existing MuJoCo env in place (creating one costs seconds) and
reproduces, episode for episode, upstream's `memory_maze_{N}x{N}(seed=s)`; `reset()` without a
seed continues the env's own random stream (a new maze each episode, as upstream).

Speed: upstream tests target contacts with a Python loop after each of the 50 physics substeps
of a step; this adapter swaps in a vectorised test with the same result, which makes stepping
~3.5x faster on a CPU (frames, rewards and target touches are checked against upstream in tests).
"""

from __future__ import annotations

import logging
import os
import types
from typing import Any

import gymnasium as gym
import numpy as np

from worldsim.envs.human_render import HumanRenderWindow, render_frame

# Headless machines: MuJoCo must render through EGL. Must be set before mujoco is imported.
os.environ.setdefault("MUJOCO_GL", "egl")

ACTION_NAMES = ("noop", "forward", "turn_left", "turn_right", "forward_left", "forward_right")
MAZE_SIZES = (9, 11, 13, 15)
# Upstream time limits (250/500/750/1000 s) at its 4 Hz control rate.
EPISODE_STEPS = {9: 1000, 11: 2000, 13: 3000, 15: 4000}
N_TARGETS = {9: 3, 11: 4, 13: 5, 15: 6}
CONTROL_FPS = 4
FRAME_SHAPE = (64, 64, 3)

# Upstream draws the maze generator's seed as the first number of the episode random state.
_MAZE_SEED_BOUND = 2**31


class _DropFreeJointWarning(logging.Filter):
    """dm_control warns on every reset that the rolling-ball walker has no free joint.

    The ball is built that way on purpose; the warning is not actionable and floods logs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Cannot set velocity on Entity with no free joint" not in record.getMessage()


def _upstream_tasks():
    """Import memory_maze lazily: it pulls in MuJoCo and dm_control (about a second)."""
    # here with the imports below: registration (`import worldsim.envs`) imports this module, loading none of them
    from worldsim.envs.legacy_gym import import_legacy_gym_quietly

    import_legacy_gym_quietly()
    from memory_maze import tasks  # MuJoCo + dm_control (~1 s): not at registration, and only after the quiet gym import

    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropFreeJointWarning) for f in absl_logger.filters):
        absl_logger.addFilter(_DropFreeJointWarning())
    return tasks


def _random_state_seed(seed: int) -> int | list[int]:
    """`np.random.RandomState.seed` takes ints below 2**32 or a list of 32-bit words.

    Seeds below 2**32 are passed unchanged so that they match upstream's `seed=` exactly.
    """
    seed = int(seed)
    if seed < 2**32:
        return seed
    words = []
    while seed:
        words.append(seed & 0xFFFFFFFF)
        seed >>= 32
    return words


def _fresh_maze_generator(maze, seed: int):
    """A new labmaze generator with `maze`'s settings and the given seed.

    labmaze keeps its own C++ random state, seeded only at construction, so reseeding means
    building a new generator (microseconds). `simplify=True` is what upstream's
    `MazeWithTargetsArena` passes; the other settings are read back from `maze`.
    """
    return type(maze)(
        height=maze.height,
        width=maze.width,
        max_rooms=maze.max_rooms,
        room_min_size=maze.room_min_size,
        room_max_size=maze.room_max_size,
        max_variations=maze.max_variations,
        spawns_per_room=maze.spawns_per_room,
        spawn_token=maze.spawn_token,
        objects_per_room=maze.objects_per_room,
        object_token=maze.object_token,
        simplify=True,
        random_seed=seed,
    )


def _install_fast_target_contact_check(task) -> None:
    """Replace each target's per-substep contact test with a vectorised one of identical meaning.

    dm_control's `TargetSphere` checks after every physics substep (50 per 4 Hz control step)
    whether any contact involves its geom by iterating `physics.data.contact` in Python. Iterating
    that pybind list costs ~0.15 ms even with one contact, so with 3-6 targets the check alone was
    more than half of a Memory Maze step on a CPU. Comparing the contact arrays' geom ids at once
    gives the same answer (tests compare against unpatched upstream, target touches included).
    """

    def update_activation(target, physics) -> None:
        if target._activated:
            return
        contacts = physics.data.contact
        touches = (contacts.geom1 == target._geom_id) | (contacts.geom2 == target._geom_id)
        allowed = target._specific_collision_geom_ids
        if allowed:
            allowed_ids = np.asarray(list(allowed))
            touches &= np.isin(contacts.geom1, allowed_ids) | np.isin(contacts.geom2, allowed_ids)
        if touches.any():
            target._activated = True
            physics.bind(target.material).rgba[-1] = 0  # hide the touched target, as upstream

    for target in task._targets:
        target._update_activation = types.MethodType(update_activation, target)


class MemoryMazeEnv(gym.Env[np.ndarray, np.int64]):
    """One Memory Maze of side `size` (9, 11, 13 or 15 cells); see the module docstring."""

    metadata = {"render_modes": ["rgb_array", "human"], "render_fps": CONTROL_FPS}

    def __init__(self, size: int = 9, render_mode: str | None = None) -> None:
        if not isinstance(size, (int, np.integer)) or size not in MAZE_SIZES:
            raise ValueError(f"Memory Maze size must be one of {MAZE_SIZES}, got {size!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, "
                f"got {render_mode!r}"
            )
        self.size = size
        self.n_targets = N_TARGETS[size]
        self.episode_steps = EPISODE_STEPS[size]
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(0, 255, FRAME_SHAPE, np.uint8)
        self.action_space = gym.spaces.Discrete(len(ACTION_NAMES))

        self._window = None
        if render_mode == "human":  # before the slow MuJoCo build, so a missing pygame fails fast
            self._window = HumanRenderWindow(f"Memory Maze {size}x{size}", fps=CONTROL_FPS)

        make_task = getattr(_upstream_tasks(), f"memory_maze_{size}x{size}")
        from memory_maze.wrappers import Wrapper as UpstreamWrapper  # MuJoCo: not at registration

        # seed=None: until the first seeded reset the env draws from OS entropy, as upstream.
        self._dm_env = make_task(seed=None, global_observables=True)
        self._composer_env = self._dm_env
        while isinstance(self._composer_env, UpstreamWrapper):  # peel upstream's dm_env wrappers
            self._composer_env = self._composer_env.env
        self._task = self._composer_env.task
        _install_fast_target_contact_check(self._task)

        self._frame: np.ndarray | None = None
        self._maze_layout: np.ndarray | None = None
        self._episode_running = False

    # ------------------------------------------------------------------ gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if options:
            raise ValueError(f"MemoryMazeEnv.reset takes no options, got {sorted(options)}")
        self._require_open()
        if seed is not None:
            self._reseed_upstream(seed)
        timestep = self._dm_env.reset()
        obs = timestep.observation
        self._maze_layout = np.array(obs["maze_layout"], dtype=np.uint8)  # fixed for the episode
        self._episode_running = True
        return self._emit(obs)

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self._require_open()
        if not self._episode_running:
            raise RuntimeError(
                "MemoryMazeEnv.step() called before reset() or after the episode ended; "
                "call reset() first"
            )
        if not self.action_space.contains(action):
            raise ValueError(
                f"action {action!r} is not in the action space {self.action_space} "
                f"(an integer in 0..{self.action_space.n - 1}: {', '.join(ACTION_NAMES)})"
            )
        timestep = self._dm_env.step(int(action))
        # dm_env: a LAST step with discount 0 is a true terminal state, with discount > 0 a
        # time-limit cut. Memory Maze only ever produces the latter.
        terminated = bool(timestep.last() and timestep.discount == 0.0)
        truncated = bool(timestep.last() and not terminated)
        if timestep.last():
            self._episode_running = False
        frame, info = self._emit(timestep.observation)
        return frame, float(timestep.reward), terminated, truncated, info

    def render(self) -> np.ndarray | None:
        return render_frame("MemoryMazeEnv", self.render_mode, self._frame, self._window)

    def close(self) -> None:
        # Freeing the physics frees its MuJoCo data and the EGL rendering context.
        if self._dm_env is not None:
            self._dm_env.close()
            self._dm_env = None
            self._composer_env = None
            self._task = None
        if self._window is not None:
            self._window.close()
            self._window = None
        self._episode_running = False

    # ------------------------------------------------------------------ extras
    @property
    def maze_layout(self) -> np.ndarray:
        """(size, size) uint8 of the current episode: 1 = free floor, 0 = wall; [y, x], row 0 at
        the bottom (see the module docstring)."""
        if self._maze_layout is None:
            raise RuntimeError("maze_layout is only known after reset()")
        return self._maze_layout.copy()

    # ------------------------------------------------------------------ internals
    def _require_open(self) -> None:
        if self._dm_env is None:
            raise RuntimeError("this MemoryMazeEnv has been closed; create a new one")

    def _reseed_upstream(self, seed: int) -> None:
        """Put the existing env in the state upstream's `memory_maze_NxN(seed=seed)` starts in.

        Upstream makes one RandomState from the seed, draws the maze generator's seed from it,
        then hands it to the composer env for everything else (wall textures, target placement
        and order, spawn pose). Reseeding that RandomState in place (every hook holds the same
        object) and rebuilding the maze generator reproduces this without rebuilding the env.

        One more piece of state leaks between upstream episodes: a target the agent spawned on
        stays `activated` until the next step, and the next reset's target draw skips activated
        targets (consuming extra random numbers). A fresh env has none activated, so neither
        does a seeded reset.
        """
        random_state = self._composer_env.random_state
        random_state.seed(_random_state_seed(seed))
        arena = self._task.root_entity
        arena._maze = _fresh_maze_generator(arena.maze, random_state.randint(_MAZE_SEED_BOUND))
        for target in self._task._targets:
            target._activated = False

    def _emit(self, obs: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """The frame and info of one dm_env observation, as fresh arrays the caller may keep."""
        # Upstream's observation buffers can be views that the next step overwrites: copy.
        self._frame = np.array(obs["image"], dtype=np.uint8)
        info = {
            "agent_pos": np.array(obs["agent_pos"], dtype=np.float64),
            "agent_dir": np.array(obs["agent_dir"], dtype=np.float64),
            "target_color": np.array(obs["target_color"], dtype=np.float64),
            "target_pos": np.array(obs["target_pos"], dtype=np.float64),
            "targets_pos": np.array(obs["targets_pos"], dtype=np.float64),
            # Upstream's remapped observation drops the index; the task holds it.
            "target_index": np.int64(self._task._current_target_ix),
        }
        if self.render_mode == "human":
            self._window.show(self._frame)
        return self._frame.copy(), info
