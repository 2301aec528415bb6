"""Policies for the viewer's agent mode: callables frame (H, W, 3) uint8 -> discrete action."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

Policy = Callable[[np.ndarray], int]


class RandomWalk:
    """Uniform random actions, each kept for a while (repeated with probability `repeat_prob`), so
    the agent wanders through the maze instead of jittering on the spot."""

    def __init__(self, n_actions: int, seed: int | None = None, repeat_prob: float = 0.75) -> None:
        if n_actions < 1:
            raise ValueError(f"n_actions must be >= 1, got {n_actions}")
        if not 0 <= repeat_prob < 1:
            raise ValueError(f"repeat_prob must be in [0, 1), got {repeat_prob}")
        self.n_actions = n_actions
        self.repeat_prob = repeat_prob
        self.rng = np.random.default_rng(seed)
        self.action: int | None = None

    def __call__(self, frame: np.ndarray) -> int:
        if self.action is None or self.rng.random() >= self.repeat_prob:
            self.action = int(self.rng.integers(self.n_actions))
        return self.action


class SB3Policy:
    """A Stable-Baselines3 model's deterministic action for one frame."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, frame: np.ndarray) -> int:
        # predict transposes (H, W, C) frames itself when the policy was trained channels-first.
        action, _ = self.model.predict(frame, deterministic=True)
        return int(np.asarray(action).reshape(()))


def load_sb3_policy(path: str | os.PathLike, device: str = "cpu") -> SB3Policy:
    """A saved SB3 model (.zip) as a policy. The zip does not say which algorithm wrote it, so the
    discrete-action algorithms are tried in turn; any of them that loads gives the same `predict`.
    SB3 zips hold pickled objects: load only files you trust."""
    from stable_baselines3 import A2C, DQN, PPO  # optional: the [rl] extra

    if not os.path.exists(path):
        raise FileNotFoundError(f"no SB3 model at {path}")
    errors = []
    for algo in (PPO, A2C, DQN):
        try:
            return SB3Policy(algo.load(path, device=device))
        except Exception as e:  # noqa: BLE001 (each algorithm fails in its own way; all are reported)
            errors.append(f"{algo.__name__}: {type(e).__name__}: {e}")
    raise ValueError(f"{path} is not a Stable-Baselines3 PPO, A2C or DQN model ({'; '.join(errors)})")
