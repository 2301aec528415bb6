"""How many training windows per second the window loader delivers, per DataLoader worker count.

Windows are drawn in random order (as training draws them), so the number includes the random
access into storage, not only sequential reads.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

from worldsim.data.windows import WindowDataset, WindowSampler

# Drawn per epoch; enough that a timing rarely crosses an epoch boundary (which restarts workers).
_SAMPLES_PER_EPOCH = 100_000


def measure_loader(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    window: int = 32,
    *,
    batch_size: int = 16,
    workers: Sequence[int] = (0, 2),
    seconds: float = 5.0,
    seed: int = 0,
    image_key: str | None = None,
    torch_threads: int | None = None,
) -> dict:
    """Windows/s for each worker count, timed after the first batch (worker start-up excluded).

    `torch_threads` sets torch's intra-op threads in this process while timing (None: as is).
    With 0 workers the batches are collated here, and on a machine busier than its core count
    a multi-threaded collate stalls on descheduled threads: 1 thread was ~40x faster there.
    DataLoader workers always run torch with 1 thread.

    Returns {"window", "batch_size", "frame_shape", "num_windows", "torch_threads",
             "windows_per_s": {workers: float}, "megabytes_per_s": {workers: float},
             "startup_s": {workers: float}}; megabytes count the uint8 frames only.
    """
    previous_threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        return _measure(sources, window, batch_size, workers, seconds, seed, image_key)
    finally:
        torch.set_num_threads(previous_threads)


def _measure(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    window: int,
    batch_size: int,
    workers: Sequence[int],
    seconds: float,
    seed: int,
    image_key: str | None,
) -> dict:
    dataset = WindowDataset(sources, window, image_key=image_key)
    h, w, c = dataset.frame_shape
    window_bytes = window * h * w * c
    result: dict = {
        "window": window,
        "batch_size": batch_size,
        "frame_shape": [h, w, c],
        "num_windows": len(dataset),
        "torch_threads": torch.get_num_threads(),
        "windows_per_s": {},
        "megabytes_per_s": {},
        "startup_s": {},
    }
    for num_workers in workers:
        rate, startup = _time_loader(dataset, batch_size, num_workers, seconds, seed)
        result["windows_per_s"][num_workers] = rate
        result["megabytes_per_s"][num_workers] = rate * window_bytes / 1e6
        result["startup_s"][num_workers] = startup
    dataset.close()
    return result


def _time_loader(
    dataset: WindowDataset, batch_size: int, num_workers: int, seconds: float, seed: int
) -> tuple[float, float]:
    """(windows/s after the first batch, seconds to the first batch)."""
    sampler = WindowSampler(dataset, seed=seed, num_samples=_SAMPLES_PER_EPOCH, replacement=True)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    began = time.perf_counter()
    started = None
    windows = 0
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        for batch in loader:
            if started is None:
                started = time.perf_counter()
                continue
            windows += len(batch["frames"])
            if time.perf_counter() - started >= seconds:
                # Returning drops the batch iterator, which shuts its workers down.
                return windows / (time.perf_counter() - started), started - began
