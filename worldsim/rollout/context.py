"""Real frames to start a dream from: a `ContextSource` samples a clip of frames and the actions
between them. Clips held in memory (`ClipContext`) and windows of a Minari dataset
(`MinariContext`) live here; the live Memory Maze source is the env adapter's
(`worldsim.envs.dream.MemoryMazeContext`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class ContextSource(Protocol):
    """Real frames to start a dream from."""

    def sample(self, rng: np.random.Generator, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
        """-> frames uint8 (n_frames, H, W, 3), actions (n_frames - 1[, D]): action t led to frame t + 1."""


def check_clip(frames: np.ndarray, actions: np.ndarray, n_frames: int, where: str) -> None:
    if frames.shape[0] < n_frames:
        raise ValueError(f"{where}: context clip has {frames.shape[0]} frames, {n_frames} are required")
    if len(actions) < n_frames - 1:
        raise ValueError(f"{where}: context clip has {len(actions)} actions, {n_frames - 1} are required")


class ClipContext:
    """Clips from episodes held in memory: lists of frames (N + 1, H, W, 3) and actions (N, ...)."""

    def __init__(self, frames: Sequence[np.ndarray], actions: Sequence[np.ndarray]) -> None:
        if len(frames) != len(actions) or not frames:
            raise ValueError("ClipContext needs as many action arrays as frame arrays, at least one")
        self.frames = [np.asarray(f) for f in frames]
        self.actions = [np.asarray(a) for a in actions]

    def sample(self, rng: np.random.Generator, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
        usable = [i for i, f in enumerate(self.frames) if len(f) >= n_frames and len(self.actions[i]) >= n_frames - 1]
        if not usable:
            longest = max(len(f) for f in self.frames)
            raise ValueError(f"ClipContext: context clip shorter than required: the longest episode has "
                             f"{longest} frames, {n_frames} are required")
        i = usable[int(rng.integers(len(usable)))]
        start = int(rng.integers(len(self.frames[i]) - n_frames + 1))
        return self.frames[i][start : start + n_frames], self.actions[i][start : start + n_frames - 1]


class MinariContext:
    """A random window of a Minari dataset (through `WindowDataset`'s window convention)."""

    def __init__(self, sources, n_frames: int) -> None:
        # here, not at the top: the GPU job imports this module (via bundled) without gymnasium, which data.windows needs
        from worldsim.data.windows import WindowDataset

        self.n_frames = n_frames
        self.windows = WindowDataset(sources, n_frames)  # refuses datasets without a long enough episode

    def sample(self, rng: np.random.Generator, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
        if n_frames != self.n_frames:
            raise ValueError(f"MinariContext was built for {self.n_frames}-frame clips, asked for {n_frames}")
        item = self.windows[int(rng.integers(len(self.windows)))]
        frames, actions = item["frames"].numpy(), item["actions"].numpy()
        check_clip(frames, actions, n_frames, "MinariContext")
        return frames, actions[: n_frames - 1]  # the window's last action leads past the clip
