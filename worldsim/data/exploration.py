"""Scripted exploration policies that drive the real envs to collect world-model training data.

Every policy has the same small interface:

    policy.reset(env, info, rng)   # at the start of an episode, after env.reset()
    action = policy.act(obs, info) # once per step, with the latest observation and info

and draws all its randomness from the numpy Generator given to `reset`, so an episode is
reproducible from (env seed, policy seed).

- `RandomWalk`: any Discrete env (Memory Maze, Crafter). Repeats each action for a geometric
  number of steps, so the agent travels instead of jittering in place.
- `Navigator` (Memory Maze): shortest paths on the maze grid to a chain of goals (targets and room
  cells), turned into turn/forward actions from the agent's position and heading.
- `Revisit` (Memory Maze): stops at a pose, leaves on a long excursion, then returns to the same
  cell and heading, again and again. These returns are what exercises long-term memory; the policy
  records them as `planned_revisits` (`data.revisits.find_revisits` finds them post hoc too).

Memory Maze geometry (upstream `memory_maze.wrappers`): `info["agent_pos"]` is (x, y) in grid
cells with (0, 0) at the bottom-left corner, `env.unwrapped.maze_layout[y, x]` is 1 for a free
cell, `info["agent_dir"]` is the unit heading in the same (x, y) axes. Measured on the real env: a
turn action rotates by ~18.4 degrees (left = counter-clockwise), forward moves ~0.25 cells per step
at full speed and the ball coasts ~0.15 cells after the last forward.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Any, ClassVar, Protocol

import gymnasium as gym
import numpy as np

Cell = tuple[int, int]  # (x, y) grid cell: maze_layout[y, x]

# Memory Maze's discrete action set.
NOOP, FORWARD, LEFT, RIGHT, FORWARD_LEFT, FORWARD_RIGHT = range(6)
MOVING_ACTIONS = (FORWARD, FORWARD_LEFT, FORWARD_RIGHT)
TURN_STEP_DEG = 18.4  # heading change of one turn action (measured)


class ExplorationPolicy(Protocol):
    name: ClassVar[str]
    requires_maze: ClassVar[bool]

    def params(self) -> dict[str, Any]:
        """Constructor arguments, JSON-able: recorded with every episode."""
        ...

    def reset(self, env: gym.Env, info: dict[str, Any], rng: np.random.Generator) -> None: ...

    def act(self, obs: Any, info: dict[str, Any]) -> int: ...


# ------------------------------------------------------------------------------ maze grid
def cell_of(pos: np.ndarray) -> Cell:
    """The grid cell containing a continuous (x, y) position."""
    return int(np.floor(pos[0])), int(np.floor(pos[1]))


def cell_center(cell: Cell) -> np.ndarray:
    return np.array([cell[0] + 0.5, cell[1] + 0.5])


def free_cells(layout: np.ndarray) -> list[Cell]:
    ys, xs = np.nonzero(layout)
    return [(int(x), int(y)) for x, y in zip(xs, ys)]


def room_cells(layout: np.ndarray) -> list[Cell]:
    """Free cells in rooms: cells of some fully free 2x2 block (corridors are 1 cell wide)."""
    free = np.asarray(layout, dtype=bool)
    block = free[:-1, :-1] & free[1:, :-1] & free[:-1, 1:] & free[1:, 1:]  # (H-1, W-1)
    in_room = np.zeros_like(free)
    for dy in (0, 1):
        for dx in (0, 1):
            in_room[dy : dy + block.shape[0], dx : dx + block.shape[1]] |= block
    return free_cells(in_room)


def shortest_path(
    layout: np.ndarray, start: Cell, goal: Cell, blocked: frozenset[Cell] = frozenset()
) -> list[Cell] | None:
    """Breadth-first shortest 4-connected path from `start` to `goal` (both included), or None.

    `blocked` cells are treated as walls (except `start` and `goal`).
    """
    height, width = layout.shape
    for name, cell in (("start", start), ("goal", goal)):
        x, y = cell
        if not (0 <= x < width and 0 <= y < height) or not layout[y, x]:
            raise ValueError(f"{name} cell {cell} is not a free cell of the {height}x{width} maze")
    came_from: dict[Cell, Cell | None] = {start: None}
    frontier = deque([start])
    while frontier:
        cell = frontier.popleft()
        if cell == goal:
            break
        x, y = cell
        for nxt in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
            nx, ny = nxt
            if (
                0 <= nx < width
                and 0 <= ny < height
                and layout[ny, nx]
                and nxt not in came_from
                and (nxt not in blocked or nxt == goal)
            ):
                came_from[nxt] = cell
                frontier.append(nxt)
    if goal not in came_from:
        return None
    path = [goal]
    while (previous := came_from[path[-1]]) is not None:
        path.append(previous)
    return path[::-1]


def corner_cells(path: list[Cell]) -> list[Cell]:
    """The cells after `path[0]` where the path turns, plus its end: the points to steer at.

    Driving straight at the next corner instead of through every cell centre keeps the agent
    moving at full speed along corridors.
    """
    corners = []
    for i in range(1, len(path) - 1):
        step_in = (path[i][0] - path[i - 1][0], path[i][1] - path[i - 1][1])
        step_out = (path[i + 1][0] - path[i][0], path[i + 1][1] - path[i][1])
        if step_in != step_out:
            corners.append(path[i])
    if len(path) > 1:
        corners.append(path[-1])
    return corners


def signed_angle_deg(from_dir: np.ndarray, to_dir: np.ndarray) -> float:
    """Angle from `from_dir` to `to_dir` in degrees, (-180, 180]; positive = counter-clockwise."""
    cross = from_dir[0] * to_dir[1] - from_dir[1] * to_dir[0]
    dot = from_dir[0] * to_dir[0] + from_dir[1] * to_dir[1]
    return float(np.degrees(np.arctan2(cross, dot)))


def turn_towards(angle_deg: float) -> int:
    return LEFT if angle_deg > 0 else RIGHT


def maze_layout_of(env: gym.Env, policy_name: str) -> np.ndarray:
    layout = getattr(env.unwrapped, "maze_layout", None)
    if layout is None:
        raise ValueError(
            f"the {policy_name!r} policy needs a Memory Maze env (env.unwrapped.maze_layout); "
            f"{env.unwrapped.__class__.__name__} has none: use the 'random' policy"
        )
    return np.asarray(layout)


# ------------------------------------------------------------------------------- steering
class PathFollower:
    """Drives the agent along the shortest path to a goal cell with turn/forward actions.

    Steering rule: turn in place while the next corner is more than `turn_in_place_deg` off the
    heading, forward+turn while it is more than `forward_tol_deg` off, else forward. The path is
    replanned whenever the agent leaves it, and after `stuck_steps` forward actions that did not
    move it (it is pressed against a wall corner), a few random turns shake it loose.
    """

    def __init__(
        self,
        layout: np.ndarray,
        rng: np.random.Generator,
        *,
        arrive_radius: float = 0.35,
        turn_in_place_deg: float = 40.0,
        forward_tol_deg: float = 12.0,
        stuck_steps: int = 4,
    ) -> None:
        self.layout = layout
        self.rng = rng
        self.arrive_radius = arrive_radius
        self.turn_in_place_deg = turn_in_place_deg
        self.forward_tol_deg = forward_tol_deg
        self.stuck_steps = stuck_steps
        self.goal: Cell | None = None
        self.blocked: frozenset[Cell] = frozenset()
        self._path_cells: set[Cell] = set()
        self._corners: list[np.ndarray] = []
        self._last_pos: np.ndarray | None = None
        self._stalled = 0
        self._unstick: list[int] = []

    def set_goal(self, goal: Cell, pos: np.ndarray, blocked: frozenset[Cell] = frozenset()) -> bool:
        """Plan to `goal`; False when it is unreachable (the goal is left unset)."""
        self.goal, self.blocked = goal, blocked
        if not self._plan(pos):
            self.goal = None
            return False
        return True

    def _plan(self, pos: np.ndarray) -> bool:
        assert self.goal is not None
        start = self._free_cell_near(pos)
        path = shortest_path(self.layout, start, self.goal, self.blocked)
        if path is None and self.blocked:  # avoiding cells is a preference, not a must
            path = shortest_path(self.layout, start, self.goal)
        if path is None:
            return False
        self._path_cells = set(path)
        self._corners = [cell_center(c) for c in corner_cells(path)]
        if not self._corners:  # already in the goal cell: steer to its centre
            self._corners = [cell_center(self.goal)]
        return True

    def _free_cell_near(self, pos: np.ndarray) -> Cell:
        # The ball's centre can sit a hair inside a wall cell's boundary; use the nearest free cell.
        cell = cell_of(pos)
        x, y = cell
        if 0 <= y < self.layout.shape[0] and 0 <= x < self.layout.shape[1] and self.layout[y, x]:
            return cell
        cells = free_cells(self.layout)
        distances = [np.linalg.norm(cell_center(c) - pos) for c in cells]
        return cells[int(np.argmin(distances))]

    def act(self, pos: np.ndarray, heading: np.ndarray) -> int | None:
        """The next action, or None once the agent is at the goal cell's centre."""
        if self.goal is None:
            raise RuntimeError("PathFollower.act called without a goal")
        moved = np.inf if self._last_pos is None else float(np.linalg.norm(pos - self._last_pos))
        self._last_pos = pos.copy()
        if self._unstick:
            return self._unstick.pop()
        if cell_of(pos) not in self._path_cells:
            self._plan(pos)
        while self._corners and np.linalg.norm(self._corners[0] - pos) < self.arrive_radius:
            self._corners.pop(0)
        if not self._corners:
            self.goal = None
            return None
        action = self._steer(pos, heading, self._corners[0])
        self._stalled = self._stalled + 1 if action in MOVING_ACTIONS and moved < 0.02 else 0
        if self._stalled >= self.stuck_steps:
            self._stalled = 0
            turn = int(self.rng.choice([LEFT, RIGHT]))
            self._unstick = [FORWARD] * 2 + [turn] * int(self.rng.integers(2, 6))
            self._plan(pos)
            return self._unstick.pop()
        return action

    def _steer(self, pos: np.ndarray, heading: np.ndarray, point: np.ndarray) -> int:
        error = signed_angle_deg(heading, point - pos)
        if abs(error) > self.turn_in_place_deg:
            return turn_towards(error)
        if abs(error) > self.forward_tol_deg:
            return FORWARD_LEFT if error > 0 else FORWARD_RIGHT
        return FORWARD


def head_for_random_cell(
    follower: PathFollower,
    pos: np.ndarray,
    pool: list[Cell],
    rng: np.random.Generator,
    blocked: frozenset[Cell] = frozenset(),
) -> Cell:
    """Point `follower` at a random reachable cell of `pool` and return that cell."""
    for _ in range(20):  # unreachable draws are rare (labmaze mazes are connected)
        if not pool:
            break
        goal = pool[rng.integers(len(pool))]
        if follower.set_goal(goal, pos, blocked):
            return goal
    raise RuntimeError(
        f"no reachable goal cell from {cell_of(pos)} in this maze (top row first):\n"
        f"{follower.layout[::-1]}"
    )


# ------------------------------------------------------------------------------- policies
class RandomWalk:
    """Uniform random actions with persistence. Works for any Discrete env.

    Each step keeps the previous action with probability `persistence`, else draws a uniform
    one (possibly the same again): with n actions, run lengths are geometric with mean
    1 / ((1 - persistence) * (1 - 1/n)).
    """

    name: ClassVar[str] = "random"
    requires_maze: ClassVar[bool] = False

    def __init__(self, persistence: float = 0.8) -> None:
        if not 0.0 <= persistence < 1.0:
            raise ValueError(f"persistence must be in [0, 1), got {persistence!r}")
        self.persistence = persistence
        self._action: int | None = None

    def params(self) -> dict[str, Any]:
        return {"persistence": self.persistence}

    def reset(self, env: gym.Env, info: dict[str, Any], rng: np.random.Generator) -> None:
        if not isinstance(env.action_space, gym.spaces.Discrete):
            raise ValueError(
                f"RandomWalk needs a Discrete action space, got {env.action_space}"
            )
        self.rng = rng
        self.n_actions = int(env.action_space.n)
        self.start = int(env.action_space.start)
        self._action = None

    def act(self, obs: Any, info: dict[str, Any]) -> int:
        if self._action is None or self.rng.random() >= self.persistence:
            self._action = self.start + int(self.rng.integers(self.n_actions))
        return self._action


class Navigator:
    """Memory Maze: walks shortest paths to a chain of goals, with bursts of random actions.

    Each goal is one of the target objects with probability `target_prob` (touching the current
    target gives the env's reward), otherwise a random room cell. With probability `epsilon` per
    step the agent takes a burst of random actions (mean length 3) before resuming its path.
    `reached_goals` lists (step, cell) of every goal reached in the episode.
    """

    name: ClassVar[str] = "navigator"
    requires_maze: ClassVar[bool] = True

    def __init__(self, target_prob: float = 0.3, epsilon: float = 0.05) -> None:
        for field, value in (("target_prob", target_prob), ("epsilon", epsilon)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{field} must be a probability in [0, 1], got {value!r}")
        self.target_prob = target_prob
        self.epsilon = epsilon

    def params(self) -> dict[str, Any]:
        return {"target_prob": self.target_prob, "epsilon": self.epsilon}

    def reset(self, env: gym.Env, info: dict[str, Any], rng: np.random.Generator) -> None:
        self.layout = maze_layout_of(env, self.name)
        self.rng = rng
        self.follower = PathFollower(self.layout, rng)
        self.goal_pool = room_cells(self.layout) or free_cells(self.layout)
        self.reached_goals: list[tuple[int, Cell]] = []
        self.goal: Cell | None = None
        self.step = 0
        self._random_burst = 0

    def act(self, obs: Any, info: dict[str, Any]) -> int:
        pos, heading = np.asarray(info["agent_pos"]), np.asarray(info["agent_dir"])
        try:
            if self._random_burst > 0:
                self._random_burst -= 1
                return int(self.rng.integers(6))
            if self.rng.random() < self.epsilon:
                self._random_burst = int(self.rng.geometric(1 / 3)) - 1
                return int(self.rng.integers(6))
            if self.follower.goal is None:
                self._new_goal(pos, info)
            action = self.follower.act(pos, heading)
            if action is None:  # reached: record it and head for the next goal right away
                self.reached_goals.append((self.step, self.goal))
                self._new_goal(pos, info)
                action = self.follower.act(pos, heading)
            return NOOP if action is None else action
        finally:
            self.step += 1

    def _new_goal(self, pos: np.ndarray, info: dict[str, Any]) -> None:
        here = cell_of(pos)
        for _ in range(20):  # a goal equal to the current cell or unreachable: draw again
            if self.rng.random() < self.target_prob:
                targets = np.asarray(info["targets_pos"])
                goal = cell_of(targets[self.rng.integers(len(targets))])
            else:
                goal = self.goal_pool[self.rng.integers(len(self.goal_pool))]
            if goal != here and self.follower.set_goal(goal, pos):
                self.goal = goal
                return
        raise RuntimeError(f"no reachable goal from cell {here} in maze\n{self.layout[::-1]}")


class _Phase(Enum):
    GO_TO_ANCHOR = "go to anchor"
    SETTLE = "turn to a random heading and stop"
    EXCURSION = "wander away"
    RETURN = "navigate back to the anchor cell"
    APPROACH = "creep onto the anchor position"
    ALIGN = "turn to the anchor heading"


class _ReturningWalker:
    """What the policies that come back on purpose (Revisit, Spin) share: a path follower over the
    maze's free cells, a step count, the revisits they plan, and the ball's speed, so that they
    record a pose only once the ball has come to rest."""

    name: ClassVar[str]

    def _start(self, env: gym.Env, rng: np.random.Generator) -> None:
        self.layout = maze_layout_of(env, self.name)
        self.rng = rng
        self.follower = PathFollower(self.layout, rng)
        self.cells = free_cells(self.layout)
        self.planned_revisits: list[tuple[int, int]] = []
        self.step = 0
        self._last_pos: np.ndarray | None = None

    def _pose_and_speed(self, info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float]:
        """(position, heading, distance moved since the last step; inf at the first step)."""
        pos, heading = np.asarray(info["agent_pos"]), np.asarray(info["agent_dir"])
        speed = np.inf if self._last_pos is None else float(np.linalg.norm(pos - self._last_pos))
        self._last_pos = pos.copy()
        return pos, heading, speed


class Revisit(_ReturningWalker):
    """Memory Maze: leave a pose for a long excursion, come back to it, repeat.

    Cycle: walk to a random anchor cell, turn to a random heading and stop (the earlier visit);
    wander between random goals, avoiding the anchor cell, for `min_excursion`..`max_excursion`
    steps; walk back, creep to within `pos_tol` of the anchor position and turn to within
    `align_tol_deg` of the anchor heading (the revisit). `planned_revisits` lists the
    (t_now, t_before) step pairs; steps index the episode's observations (0 = the reset frame).
    """

    name: ClassVar[str] = "revisit"
    requires_maze: ClassVar[bool] = True

    def __init__(
        self,
        min_excursion: int = 100,
        max_excursion: int = 500,
        pos_tol: float = 0.2,
        align_tol_deg: float = 10.0,
    ) -> None:
        if not 1 <= min_excursion <= max_excursion:
            raise ValueError(
                f"need 1 <= min_excursion <= max_excursion, got {min_excursion}, {max_excursion}"
            )
        if pos_tol <= 0:
            raise ValueError(f"pos_tol must be positive, got {pos_tol!r}")
        if not TURN_STEP_DEG / 2 <= align_tol_deg <= 180:
            raise ValueError(
                f"align_tol_deg must be in [{TURN_STEP_DEG / 2}, 180] (one turn action rotates "
                f"{TURN_STEP_DEG} degrees), got {align_tol_deg!r}"
            )
        self.min_excursion = min_excursion
        self.max_excursion = max_excursion
        self.pos_tol = pos_tol
        self.align_tol_deg = align_tol_deg

    def params(self) -> dict[str, Any]:
        return {
            "min_excursion": self.min_excursion,
            "max_excursion": self.max_excursion,
            "pos_tol": self.pos_tol,
            "align_tol_deg": self.align_tol_deg,
        }

    def reset(self, env: gym.Env, info: dict[str, Any], rng: np.random.Generator) -> None:
        self._start(env, rng)
        self._start_cycle(np.asarray(info["agent_pos"]))

    def _start_cycle(self, pos: np.ndarray) -> None:
        self.phase = _Phase.GO_TO_ANCHOR
        here = cell_of(pos)
        self.anchor_cell = head_for_random_cell(
            self.follower, pos, [c for c in self.cells if c != here], self.rng
        )

    def act(self, obs: Any, info: dict[str, Any]) -> int:
        pos, heading, speed = self._pose_and_speed(info)
        try:
            return self._act(pos, heading, speed)
        finally:
            self.step += 1

    def _act(self, pos: np.ndarray, heading: np.ndarray, speed: float) -> int:
        # Phases fall through to the next one within a step, so no step is wasted on a NOOP.
        if self.phase is _Phase.GO_TO_ANCHOR:
            action = self.follower.act(pos, heading)
            if action is not None:
                return action
            self.phase = _Phase.SETTLE
            self._settle_turns = int(self.rng.integers(0, round(360 / TURN_STEP_DEG)))
            self._settle_turn = int(self.rng.choice([LEFT, RIGHT]))
        if self.phase is _Phase.SETTLE:
            if self._settle_turns > 0:
                self._settle_turns -= 1
                return self._settle_turn
            if speed > 0.01:  # let the ball stop rolling so the recorded pose is where it rests
                return NOOP
            self.anchor_step = self.step
            self.anchor_pos, self.anchor_dir = pos.copy(), heading.copy()
            self.excursion_end = self.step + int(
                self.rng.integers(self.min_excursion, self.max_excursion + 1)
            )
            self.phase = _Phase.EXCURSION
            self.follower.goal = None
        if self.phase is _Phase.EXCURSION:
            if self.step < self.excursion_end:
                action = None if self.follower.goal is None else self.follower.act(pos, heading)
                if action is None:  # start of the excursion, or a goal reached: pick the next
                    self._excursion_goal(pos)
                    action = self.follower.act(pos, heading)
                return NOOP if action is None else action
            self.phase = _Phase.RETURN
            if not self.follower.set_goal(self.anchor_cell, pos):
                raise RuntimeError(f"anchor cell {self.anchor_cell} became unreachable")
        if self.phase is _Phase.RETURN:
            action = self.follower.act(pos, heading)
            if action is not None:
                return action
            self.phase = _Phase.APPROACH
            self._approach_budget = 30
        if self.phase is _Phase.APPROACH:
            offset = self.anchor_pos - pos
            if np.linalg.norm(offset) > self.pos_tol and self._approach_budget > 0:
                self._approach_budget -= 1
                error = signed_angle_deg(heading, offset)
                if abs(error) > 20.0:
                    return turn_towards(error)
                # One forward pulse from rest carries the ball ~0.2 cells: pulse, then coast.
                return FORWARD if speed < 0.01 else NOOP
            self.phase = _Phase.ALIGN
        if self.phase is _Phase.ALIGN:
            error = signed_angle_deg(heading, self.anchor_dir)
            if abs(error) > self.align_tol_deg:
                return turn_towards(error)
            self.planned_revisits.append((self.step, self.anchor_step))
            self._start_cycle(pos)
            return self._act(pos, heading, speed)
        raise AssertionError(f"unhandled phase {self.phase}")

    def _excursion_goal(self, pos: np.ndarray) -> None:
        here = cell_of(pos)
        far = [
            c
            for c in self.cells
            if abs(c[0] - self.anchor_cell[0]) + abs(c[1] - self.anchor_cell[1]) >= 3 and c != here
        ]
        pool = far or [c for c in self.cells if c != here]
        # Avoid the anchor cell, so the excursion does not see the anchor view again on the way.
        head_for_random_cell(self.follower, pos, pool, self.rng, frozenset({self.anchor_cell}))


class Spin(_ReturningWalker):
    """Memory Maze: the cheapest revisits there are, views that come back after 18-60 steps.

    Cycle: walk to a random cell and come to rest, then either turn on the spot for one to
    `max_turns` full turns in one direction (a full turn is round(360 / TURN_STEP_DEG) = 20 turn
    actions, so the first view returns after 20, 40, 60 steps), or look aside and back: k turns
    one way, 2k the other, k back (k drawn in `min_look`..`max_look`, 9..12: the first view
    returns after 2k and 4k steps, last seen 2k steps before each time). Both put the earlier
    view beyond a 9- or 16-frame attention window (the bundle's, the causal baseline's) while
    keeping it inside a 64-frame training window: memory a model can learn at our scale. The walks in
    between bring new views. `planned_revisits` lists the (t_now, t_before) step pairs; steps
    index the episode's observations (0 = the reset frame).
    """

    name: ClassVar[str] = "spin"
    requires_maze: ClassVar[bool] = True
    FULL_TURN = round(360 / TURN_STEP_DEG)

    def __init__(self, max_turns: int = 3, min_look: int = 9, max_look: int = 12, look_prob: float = 0.5) -> None:
        if max_turns < 1 or not 1 <= min_look <= max_look:
            raise ValueError(f"need max_turns >= 1 and 1 <= min_look <= max_look, got {max_turns}, {min_look}, {max_look}")
        if not 0.0 <= look_prob <= 1.0:
            raise ValueError(f"look_prob must be a probability in [0, 1], got {look_prob!r}")
        self.max_turns, self.min_look, self.max_look, self.look_prob = max_turns, min_look, max_look, look_prob

    def params(self) -> dict[str, Any]:
        return {"max_turns": self.max_turns, "min_look": self.min_look, "max_look": self.max_look,
                "look_prob": self.look_prob}

    def reset(self, env: gym.Env, info: dict[str, Any], rng: np.random.Generator) -> None:
        self._start(env, rng)
        self.turns: list[int] = []
        """The turn actions still to take at the current spot (empty: walking or settling)."""
        self._settling = False

    def act(self, obs: Any, info: dict[str, Any]) -> int:
        pos, heading, speed = self._pose_and_speed(info)
        try:
            if self.turns:
                return self.turns.pop(0)
            if not self._settling:
                if self.follower.goal is None:  # a walk begins
                    here = cell_of(pos)
                    head_for_random_cell(self.follower, pos, [c for c in self.cells if c != here], self.rng)
                action = self.follower.act(pos, heading)
                if action is not None:
                    return action
                self._settling = True  # arrived (the follower has dropped its goal)
            if speed > 0.01:  # come to rest first, so the views of the spot are taken from one place
                return NOOP
            self._settling = False
            self._plan_turns()
            return self.turns.pop(0)
        finally:
            self.step += 1

    def _plan_turns(self) -> None:
        """Queue the turns at this spot and record when the first view comes back."""
        t0 = self.step  # the view before the first turn
        one, other = (LEFT, RIGHT) if self.rng.random() < 0.5 else (RIGHT, LEFT)
        if self.rng.random() < self.look_prob:
            k = int(self.rng.integers(self.min_look, self.max_look + 1))
            self.turns = [one] * k + [other] * (2 * k) + [one] * k
            self.planned_revisits += [(t0 + 2 * k, t0), (t0 + 4 * k, t0)]
        else:
            n = int(self.rng.integers(1, self.max_turns + 1))
            self.turns = [one] * (n * self.FULL_TURN)
            self.planned_revisits += [(t0 + j * self.FULL_TURN, t0) for j in range(1, n + 1)]


POLICIES: dict[str, type[RandomWalk] | type[Navigator] | type[Revisit] | type[Spin]] = {
    policy.name: policy for policy in (RandomWalk, Navigator, Revisit, Spin)
}
