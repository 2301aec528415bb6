"""The real Memory Maze beside the dream, stepped with the same actions (DIAMOND's dream/real
switch, shown side by side), so one sees where the model's imagination leaves reality.

The env is the one the dream's context came from (`MemoryMazeContext(env=...)`): sampling a
context resets it from a seed and plays the context's actions, which leaves it exactly at the
frame the dream starts from. After that every dream action is applied to it too. While the real
side is hidden its steps are only queued, and played when it is shown again (`catch_up`), so
hiding it costs nothing yet the two never drift apart.

An env in a worker process (`SubprocessEnv`, which `worldsim play` uses) steps beside the dream:
`begin(action)` sends the step before the dream's own, `finish()` collects it after, so a frame
costs the longer of the two steps rather than their sum.
"""

from __future__ import annotations

import time

import numpy as np


class RealSide:
    def __init__(self, env) -> None:
        if getattr(env, "render_mode", None) != "rgb_array":
            raise ValueError("the real side needs the env created with render_mode='rgb_array'")
        self.env = env
        self.frame: np.ndarray | None = None
        self.steps = 0
        self.total_reward = 0.0
        self.done = False
        self.step_ms = 0.0
        self.actions: list[int] = []  # applied since the context, in order
        self.pending: list[int] = []  # queued while hidden
        self._live = False  # the step begun last is to be shown
        self._in_flight = False  # a step_async awaits finish()

    @property
    def seed(self) -> int | None:
        """The seed the env was last reset from (the dream's current context)."""
        return self.env.np_random_seed

    def restart(self) -> None:
        """Call after the context source has reset the env: it now stands at the context's end."""
        self.frame = self.env.render()
        self.steps, self.total_reward, self.done = 0, 0.0, False
        self.actions, self.pending = [], []

    def begin(self, action: int, live: bool) -> None:
        """The dream is about to take `action`. Shown (`live`) with nothing queued and an env that
        steps in a worker (`step_async`), the real step starts now; else it is queued (`finish`
        plays it when live). `finish()` must follow before anything else asks the env."""
        self.pending.append(int(action))
        self._live = live
        if live and len(self.pending) == 1 and not self.done and hasattr(self.env, "step_async"):
            self.env.step_async(self.pending[0])
            self._in_flight = True

    def finish(self) -> None:
        """After the dream's step: the real step's result (the time it made the frame wait is
        `step_ms`), or the queued steps when shown."""
        if self._in_flight:
            self._in_flight = False
            t0 = time.perf_counter()
            result = self.env.step_wait()
            self._record(self.pending.pop(), result, 1000 * (time.perf_counter() - t0))
        elif self._live:
            self.catch_up()

    def catch_up(self) -> None:
        for action in self.pending:
            if self.done:  # Memory Maze's time limit: the real episode is over, the dream goes on
                break
            t0 = time.perf_counter()
            result = self.env.step(action)
            self._record(action, result, 1000 * (time.perf_counter() - t0))
        self.pending = []

    def _record(self, action: int, result: tuple, ms: float) -> None:
        obs, reward, terminated, truncated, _ = result
        self.step_ms = ms
        self.frame = obs
        self.steps += 1
        self.total_reward += reward
        self.actions.append(action)
        self.done = terminated or truncated
