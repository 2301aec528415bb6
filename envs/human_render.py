"""The pygame window behind `render_mode="human"` of worldsim's envs.

Gymnasium's convention: a "human" env draws its current frame on every `reset` and `step` and
paces itself to `metadata["render_fps"]`, so watching an episode runs at the env's real speed.

The window lives in a worker process of its own (`worldsim.envs.subprocess_env.Worker`), started
at the first frame: pygame's window (GLX under X11, EGL with SDL's "offscreen" driver) and
MuJoCo's EGL rendering break each other in one process, so the env's process never opens one.
Any number of human-render envs can then be made and closed in one process.
"""

from __future__ import annotations

import importlib.util
import os
import time

import gymnasium as gym
import numpy as np


class HumanRenderWindow:
    """Shows (H, W, 3) uint8 frames, scaled up by an integer factor (nearest neighbour)."""

    def __init__(self, title: str, fps: float, scale: int = 8) -> None:
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if importlib.util.find_spec("pygame") is None:  # fail now, not in the window's process
            raise ImportError(
                "render_mode='human' needs pygame, which is not installed: "
                "pip install 'worldsim[viewer]' (or use render_mode='rgb_array')"
            )
        self._title = title
        self._period = 1.0 / fps
        self._scale = scale
        self._worker = None
        self._last_shown: float | None = None

    def show(self, frame: np.ndarray) -> None:
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(
                f"expected an (H, W, 3) uint8 frame, got shape {frame.shape} dtype {frame.dtype}"
            )
        if self._worker is None:
            # here, not at the top: registration (`import worldsim.envs`) imports this module
            from worldsim.envs.subprocess_env import Worker

            self._worker = Worker(PygameWindow, self._title, self._scale, name=f"{self._title!r} window")
        self._worker.call("show", frame)  # waits until drawn: the env cannot run ahead of its window
        # Pace to the env's frame rate (pygame's Clock.tick, kept here where the env runs).
        if self._last_shown is not None:
            wait = self._last_shown + self._period - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        self._last_shown = time.perf_counter()

    def close(self) -> None:
        worker, self._worker = self._worker, None
        self._last_shown = None
        if worker is not None:
            worker.close()  # the window closes with its process


class PygameWindow:
    """The window itself, in the worker process: it owns that process's display."""

    def __init__(self, title: str, scale: int) -> None:
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        import pygame  # optional: the [viewer] extra (and only after the prompt is hidden above)

        self._pygame = pygame
        self._title = title
        self._scale = scale
        self._screen = None

    def show(self, frame: np.ndarray) -> None:
        pygame = self._pygame
        height, width = frame.shape[:2]
        size = (width * self._scale, height * self._scale)
        if self._screen is None or self._screen.get_size() != size:
            pygame.display.init()  # only the display: audio and joystick are not needed
            pygame.display.set_caption(self._title)
            self._screen = pygame.display.set_mode(size)
        # pygame surfaces are indexed (x, y): transpose the (H, W) frame to (W, H).
        scaled = np.repeat(np.repeat(frame, self._scale, axis=0), self._scale, axis=1)
        pygame.surfarray.blit_array(self._screen, scaled.transpose(1, 0, 2))
        pygame.display.flip()
        self.worker_idle()

    def worker_idle(self) -> None:
        # Draining the event queue keeps the OS from marking the window as not responding, also
        # while the env waits between frames.
        if self._screen is not None:
            self._pygame.event.pump()

    def close(self) -> None:
        if self._screen is not None:
            self._pygame.display.quit()
            self._screen = None


def render_frame(name: str, render_mode: str | None, frame: np.ndarray | None,
                 window: HumanRenderWindow | None) -> np.ndarray | None:
    """`Env.render()` of an env that keeps its last frame (`name` for the messages): a copy of it
    for "rgb_array", shown in `window` for "human"; without a render mode a warning and None."""
    if render_mode is None:
        gym.logger.warn(f"{name}.render() called without a render_mode; "
                        "create the env with render_mode='rgb_array' or 'human'")
        return None
    if frame is None:
        raise RuntimeError(f"{name}.render() called before reset()")
    if render_mode == "rgb_array":
        return frame.copy()
    window.show(frame)
    return None
