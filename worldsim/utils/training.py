"""What every training loop here shares (codec, world model, GPU job): the learning-rate schedule,
the divergence error, and the resume check's comparison of saved and asked-for settings."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the message names the step and the last good checkpoint."""


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """lr(step) / peak lr: linear warmup over `warmup` steps, then a cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def diverged(what: str, value: float, step: int, last_checkpoint: Any, lr: float, stopped: str = "training stopped") -> TrainingDiverged:
    """The error for a non-finite `what` (loss, gradient norm) at `step` (1-based: the step being taken)."""
    where = str(last_checkpoint) if last_checkpoint is not None else "none (no checkpoint written yet)"
    return TrainingDiverged(
        f"non-finite {what} ({value}) at step {step}; {stopped}. Last good checkpoint: {where}. Resume from it "
        f"with a lower learning rate (now {lr:.3g}) or a smaller grad_clip, or check the data."
    )


def setting_differences(saved: Mapping[str, Any], asked: Mapping[str, Any], keys: Iterable[str],
                        legacy: Mapping[str, Any] | None = None) -> list[str]:
    """'key: run has X, asked for Y' for each key a resumed run must keep. `legacy`: the value a
    run written before a key existed used (its saved settings lack the key)."""
    saved = {**(legacy or {}), **saved}
    return [f"{k}: run has {saved.get(k)!r}, asked for {asked[k]!r}" for k in keys if saved.get(k) != asked[k]]
