"""The pygame window behind `render_mode="human"` of worldsim's envs.

Gymnasium's convention: a "human" env draws its current frame on every `reset` and `step` and
paces itself to `metadata["render_fps"]`, so watching an episode runs at the env's real speed.
"""

from __future__ import annotations

import numpy as np


class HumanRenderWindow:
    """Shows (H, W, 3) uint8 frames, scaled up by an integer factor (nearest neighbour)."""

    def __init__(self, title: str, fps: float, scale: int = 8) -> None:
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        try:
            import pygame
        except ImportError:
            raise ImportError(
                "render_mode='human' needs pygame, which is not installed: "
                "pip install 'worldsim[viewer]' (or use render_mode='rgb_array')"
            ) from None
        self._pygame = pygame
        self._title = title
        self._fps = fps
        self._scale = scale
        self._screen = None
        self._clock = None

    def show(self, frame: np.ndarray) -> None:
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(
                f"expected an (H, W, 3) uint8 frame, got shape {frame.shape} dtype {frame.dtype}"
            )
        pygame = self._pygame
        height, width = frame.shape[:2]
        if self._screen is None:
            pygame.display.init()  # only the display: audio and joystick are not needed
            pygame.display.set_caption(self._title)
            self._screen = pygame.display.set_mode((width * self._scale, height * self._scale))
            self._clock = pygame.time.Clock()
        # pygame surfaces are indexed (x, y): transpose the (H, W) frame to (W, H).
        scaled = np.repeat(np.repeat(frame, self._scale, axis=0), self._scale, axis=1)
        pygame.surfarray.blit_array(self._screen, scaled.transpose(1, 0, 2))
        # Draining the event queue keeps the OS from marking the window as not responding.
        pygame.event.pump()
        pygame.display.flip()
        self._clock.tick(self._fps)

    def close(self) -> None:
        if self._screen is None:
            return
        # SDL's "offscreen" driver (picked on machines without a display) renders through EGL,
        # and quitting it terminates the process-wide EGL display that MuJoCo also renders
        # with: every Memory Maze env created afterwards would fail. That window is invisible
        # anyway, so it is left open; pygame closes it at interpreter exit.
        if self._pygame.display.get_driver() != "offscreen":
            self._pygame.display.quit()
        self._screen = None
