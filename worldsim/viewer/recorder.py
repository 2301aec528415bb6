"""Screen recordings: (H, W, 3) uint8 frames to an mp4 (ffmpeg from imageio-ffmpeg) or a gif."""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v2 as imageio
import imageio.v3 as iio
import numpy as np

FORMATS = (".mp4", ".gif")


class VideoRecorder:
    """mp4 frames are streamed to ffmpeg as they come (long sessions stay out of memory); a gif is
    written in one go on `close`, since the gif writer wants every frame at once."""

    def __init__(self, path: str | os.PathLike, fps: float) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in FORMATS:
            raise ValueError(f"record to one of {FORMATS}, got {self.path.name!r}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = float(fps)
        self.n_frames = 0
        self._shape: tuple[int, ...] | None = None
        self._gif_frames: list[np.ndarray] = []
        self._writer = None
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, frame: np.ndarray) -> None:
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 frame, got {frame.shape} {frame.dtype}")
        if self._shape is None:
            self._shape = frame.shape
        elif frame.shape != self._shape:
            raise ValueError(f"frame {frame.shape} differs from the video's {self._shape}")
        if self.path.suffix.lower() == ".gif":
            self._gif_frames.append(frame.copy())
        else:
            if self._writer is None:
                self._writer = imageio.get_writer(self.path, format="FFMPEG", fps=self.fps, macro_block_size=16)
            self._writer.append_data(frame)
        self.n_frames += 1

    def close(self) -> Path | None:
        """Finish the file; returns its path, or None when no frame was recorded (no file)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        elif self._gif_frames:
            iio.imwrite(self.path, np.stack(self._gif_frames), duration=1000 / self.fps, loop=0)
            self._gif_frames = []
        return self.path if self.n_frames else None
