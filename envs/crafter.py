"""Crafter (Hafner, 2021, arXiv 2109.06780) as a Gymnasium environment.

Wraps `crafter.Env` (old gym API) without changing its dynamics, frames or reward:
observation (size, size, 3) uint8 (64x64 by default), Discrete(17) actions named in
`ACTION_NAMES` (crafter's own names and order), reward exactly crafter's (health change / 10 each
step, +1 the first time each achievement is unlocked in an episode).
`terminated` when the player dies (health 0); `truncated` when the episode reaches `length` steps
alive.

Info (identical keys, shapes and dtypes after `reset` and every `step`):
  "inventory"     int64 (16,)  counts in the order of `INVENTORY_NAMES` (health, food, drink and
                               energy are the vital stats, 0..9)
  "achievements"  int64 (22,)  how often each achievement of `ACHIEVEMENT_NAMES` happened so far
  "player_pos"    int64 (2,)   (x, y) cell of the player in the `area` world
  "player_facing" int64 (2,)   unit (dx, dy) the player faces: (0, 1) down, (0, -1) up,
                               (-1, 0) left, (1, 0) right

Seeding: `reset(seed=s)` starts from the same world as crafter's first episode of
`crafter.Env(seed=s)`; `reset()` continues with crafter's next episode (world seed derived from
(seed, episode number)). Upstream crafter is not reproducible beyond that: its world keeps the
creatures of each chunk in a `set`, whose iteration order follows memory addresses, and picks the
creature to despawn by index into that order. This adapter keeps those sets in insertion order, so
the same seed and actions give the same episode; the despawn choice stays uniformly random.
"""

from __future__ import annotations

import collections
from typing import Any

import gymnasium as gym
import numpy as np

from worldsim.envs.human_render import HumanRenderWindow, render_frame
from worldsim.envs.legacy_gym import import_legacy_gym_quietly

ACTION_NAMES = (
    "noop",
    "move_left",
    "move_right",
    "move_up",
    "move_down",
    "do",
    "sleep",
    "place_stone",
    "place_table",
    "place_furnace",
    "place_plant",
    "make_wood_pickaxe",
    "make_stone_pickaxe",
    "make_iron_pickaxe",
    "make_wood_sword",
    "make_stone_sword",
    "make_iron_sword",
)
INVENTORY_NAMES = (
    "health",
    "food",
    "drink",
    "energy",
    "sapling",
    "wood",
    "stone",
    "coal",
    "iron",
    "diamond",
    "wood_pickaxe",
    "stone_pickaxe",
    "iron_pickaxe",
    "wood_sword",
    "stone_sword",
    "iron_sword",
)
ACHIEVEMENT_NAMES = (
    "collect_coal",
    "collect_diamond",
    "collect_drink",
    "collect_iron",
    "collect_sapling",
    "collect_stone",
    "collect_wood",
    "defeat_skeleton",
    "defeat_zombie",
    "eat_cow",
    "eat_plant",
    "make_iron_pickaxe",
    "make_iron_sword",
    "make_stone_pickaxe",
    "make_stone_sword",
    "make_wood_pickaxe",
    "make_wood_sword",
    "place_furnace",
    "place_plant",
    "place_stone",
    "place_table",
    "wake_up",
)
# crafter's GUI plays at 5 fps.
RENDER_FPS = 5
# Bound of the seeds crafter draws for itself when given none (its worlds use seeds below it too).
_SEED_BOUND = 2**31 - 1


def _import_crafter():
    """Import crafter, checking that its names still match the documented orders above."""
    import_legacy_gym_quietly()
    import crafter  # after import_legacy_gym_quietly(): crafter imports gym, whose notice must be silenced first
    from crafter import constants  # same: after the quiet gym import above

    found = {
        "ACTION_NAMES": tuple(constants.actions),
        "INVENTORY_NAMES": tuple(constants.items),
        "ACHIEVEMENT_NAMES": tuple(constants.achievements),
    }
    expected = {
        "ACTION_NAMES": ACTION_NAMES,
        "INVENTORY_NAMES": INVENTORY_NAMES,
        "ACHIEVEMENT_NAMES": ACHIEVEMENT_NAMES,
    }
    for name, names in found.items():
        if names != expected[name]:
            raise ImportError(
                f"the installed crafter ({getattr(crafter, '__version__', '?')}) has {name} "
                f"{names}, but worldsim.envs.crafter documents {expected[name]}; "
                "worldsim is tested with crafter==1.8.3"
            )
    return crafter


class _InsertionOrderedSet:
    """The part of `set` that crafter's World uses for a chunk's objects, iterated in insertion
    order (a dict's keys) instead of memory-address order."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: dict[Any, None] = {}

    def add(self, item) -> None:
        self._items[item] = None

    def remove(self, item) -> None:
        del self._items[item]  # KeyError for a missing item, like set.remove

    def __contains__(self, item) -> bool:
        return item in self._items

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def _make_object_order_reproducible(crafter_env) -> None:
    """Have `crafter_env`'s world build its per-chunk object sets in insertion order.

    `World.reset` (called by every `crafter.Env.reset`, before the world is populated) creates
    the chunk table afresh, so the instance's `reset` is wrapped to swap the set type each time.
    """
    world = crafter_env._world
    upstream_reset = world.reset

    def reset(seed=None) -> None:
        upstream_reset(seed=seed)
        world._chunks = collections.defaultdict(_InsertionOrderedSet)

    world.reset = reset


class CrafterEnv(gym.Env[np.ndarray, np.int64]):
    """Crafter's open world; see the module docstring.

    size:   side of the square observation in pixels.
    area:   side of the square world in cells.
    length: steps after which an episode is truncated.
    """

    metadata = {"render_modes": ["rgb_array", "human"], "render_fps": RENDER_FPS}

    def __init__(
        self,
        size: int = 64,
        area: int = 64,
        length: int = 10000,
        render_mode: str | None = None,
    ) -> None:
        # crafter draws a 9x9-cell view and fails below 2 pixels per cell.
        for name, value, minimum in (("size", size, 18), ("area", area, 16), ("length", length, 1)):
            if not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, "
                f"got {render_mode!r}"
            )
        self.size = int(size)
        self.area = int(area)
        self.length = int(length)
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(0, 255, (self.size, self.size, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(len(ACTION_NAMES))

        self._crafter_module = _import_crafter()
        self._crafter: Any = None  # the crafter.Env of the current seed, built on reset
        self._frame: np.ndarray | None = None
        self._episode_running = False
        self._closed = False
        self._window = None
        if render_mode == "human":
            self._window = HumanRenderWindow("Crafter", fps=RENDER_FPS, scale=max(1, 512 // size))

    # ------------------------------------------------------------------ gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if options:
            raise ValueError(f"CrafterEnv.reset takes no options, got {sorted(options)}")
        self._require_open()
        if seed is not None or self._crafter is None:
            # crafter.Env numbers its episodes from its construction seed, so a new seed needs a
            # new crafter.Env (cheap: ~0.05 s; world generation on reset dominates).
            crafter_seed = seed if seed is not None else int(self.np_random.integers(_SEED_BOUND))
            self._crafter = self._crafter_module.Env(
                area=(self.area, self.area),
                size=(self.size, self.size),
                length=self.length,
                seed=crafter_seed,
            )
            _make_object_order_reproducible(self._crafter)
        self._frame = self._crafter.reset()
        self._episode_running = True
        return self._emit()

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self._require_open()
        if not self._episode_running:
            raise RuntimeError(
                "CrafterEnv.step() called before reset() or after the episode ended; "
                "call reset() first"
            )
        if not self.action_space.contains(action):
            raise ValueError(
                f"action {action!r} is not in the action space {self.action_space} "
                f"(an integer in 0..{self.action_space.n - 1}, see ACTION_NAMES)"
            )
        self._frame, reward, done, crafter_info = self._crafter.step(int(action))
        # crafter's discount is 0 exactly when the player died; any other end is the time limit.
        terminated = crafter_info["discount"] == 0.0
        truncated = bool(done and not terminated)
        if done:
            self._episode_running = False
        frame, info = self._emit()
        return frame, float(reward), bool(terminated), truncated, info

    def render(self) -> np.ndarray | None:
        return render_frame("CrafterEnv", self.render_mode, self._frame, self._window)

    def close(self) -> None:
        if self._window is not None:
            self._window.close()
            self._window = None
        self._episode_running = False
        self._closed = True

    # ------------------------------------------------------------------ internals
    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError("CrafterEnv is closed: make a new env (step / reset after close() are refused)")

    def _emit(self) -> tuple[np.ndarray, dict[str, Any]]:
        """The current frame and info, as fresh arrays the caller may keep."""
        player = self._crafter._player
        info = {
            "inventory": np.array([player.inventory[n] for n in INVENTORY_NAMES], np.int64),
            "achievements": np.array([player.achievements[n] for n in ACHIEVEMENT_NAMES], np.int64),
            "player_pos": np.array(player.pos, np.int64),
            "player_facing": np.array(player.facing, np.int64),
        }
        if self.render_mode == "human":
            self._window.show(self._frame)
        return self._frame.copy(), info
