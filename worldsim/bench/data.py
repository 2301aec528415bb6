"""`worldsim bench data`: how fast real data comes in and goes out.

Three figures, each measured on this machine in one run:
  * Memory Maze steps/s: the bare upstream dm_env, our Gymnasium adapter, and our adapter plus
    the whole collection path (policy, episode buffering, worker processes, atomic Minari writes).
    The overhead of adapter + collection over the bare env should stay within 10%.
  * Loader windows/s (T frames at 64x64) with 0 and 2 DataLoader workers, read from the dataset
    that the collection step just wrote.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worldsim.collect import CollectConfig, collect
from worldsim.data.bench_loader import measure_loader
from worldsim.envs.memory_maze import MemoryMazeEnv


@dataclass
class DataBenchConfig:
    maze_size: int = 9
    """Memory Maze size (9, 11, 13 or 15)."""
    env_steps: int = 300
    """Steps timed for the bare env and for the adapter (after a reset, not counting it)."""
    collect_workers: int = 1
    """Worker processes for the collection figure (1 compares like with like against the bare env)."""
    collect_episodes: int = 2
    """Episodes collected; env creation and resets are included in the collection time."""
    collect_steps: int = 300
    """Steps per collected episode."""
    window: int = 32
    """Window length T for the loader figure."""
    loader_seconds: float = 4.0
    """Seconds each loader measurement runs."""
    seed: int = 0
    """Seeds the mazes and the random actions."""


def _random_actions(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 6, size=n)


def measure_bare_env(size: int, steps: int, seed: int) -> dict[str, float]:
    """Upstream memory_maze dm_env, stepped with random actions."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    from memory_maze import tasks  # here: after MUJOCO_GL is set (MuJoCo reads it when it loads)

    env = getattr(tasks, f"memory_maze_{size}x{size}")(seed=seed)
    env.reset()
    actions = _random_actions(steps, seed)
    start = time.perf_counter()
    for a in actions:
        if env.step(int(a)).last():
            env.reset()
    elapsed = time.perf_counter() - start
    env.close()
    return {"steps": steps, "seconds": elapsed, "steps_per_s": steps / elapsed}


def measure_adapter(size: int, steps: int, seed: int) -> dict[str, float]:
    """Our Gymnasium adapter (with the extra state computed into `info` every step)."""
    env = MemoryMazeEnv(size=size)
    env.reset(seed=seed)
    actions = _random_actions(steps, seed)
    start = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(int(a))
        if terminated or truncated:
            env.reset()
    elapsed = time.perf_counter() - start
    env.close()
    return {"steps": steps, "seconds": elapsed, "steps_per_s": steps / elapsed}


def measure_collection(cfg: DataBenchConfig, root: Path) -> dict[str, Any]:
    """`worldsim collect` end to end, random-walk policy, timed from start to last commit."""
    dataset_id = "bench/memory-maze-v0"
    collect_cfg = CollectConfig(
        env_id=f"worldsim/MemoryMaze-{cfg.maze_size}x{cfg.maze_size}-v0",
        policy="random",
        episodes=cfg.collect_episodes,
        workers=cfg.collect_workers,
        max_steps=cfg.collect_steps,
        seed=cfg.seed,
        dataset_id=dataset_id,
        root=str(root),
        description="worldsim bench data",
    )
    start = time.perf_counter()
    collect(collect_cfg)
    elapsed = time.perf_counter() - start
    steps = cfg.collect_episodes * cfg.collect_steps
    return {
        "steps": steps,
        "seconds": elapsed,
        "steps_per_s": steps / elapsed,
        "workers": cfg.collect_workers,
        "dataset": str(root / dataset_id),
    }


def run(cfg: DataBenchConfig) -> dict[str, Any]:
    results: dict[str, Any] = {"config": asdict(cfg), "cpu_count": os.cpu_count()}
    results["bare_env"] = measure_bare_env(cfg.maze_size, cfg.env_steps, cfg.seed)
    results["adapter"] = measure_adapter(cfg.maze_size, cfg.env_steps, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="worldsim-bench-") as tmp:
        results["collection"] = measure_collection(cfg, Path(tmp))
        loader = measure_loader(
            [results["collection"]["dataset"]],
            window=cfg.window,
            workers=(0, 2),
            seconds=cfg.loader_seconds,
        )
    results["loader"] = loader
    bare = results["bare_env"]["steps_per_s"]
    # > 1 means faster than the bare env; the goal is >= 0.9 (at most 10% overhead).
    results["speed_vs_bare"] = {
        "adapter": results["adapter"]["steps_per_s"] / bare,
        "adapter_plus_collection": results["collection"]["steps_per_s"] / bare,
    }
    return results


def format_table(results: dict[str, Any]) -> str:
    bare = results["bare_env"]["steps_per_s"]
    lines = [
        f"Memory Maze {results['config']['maze_size']}x{results['config']['maze_size']} "
        f"on {results['cpu_count']} cores",
        f"  {'path':<52} {'steps/s':>9} {'vs bare':>8}",
    ]
    rows = [
        ("bare dm_env", results["bare_env"]),
        ("Gymnasium adapter", results["adapter"]),
        (f"adapter + collect ({results['collection']['workers']} worker, incl. env creation)",
         results["collection"]),
    ]
    for name, row in rows:
        lines.append(f"  {name:<52} {row['steps_per_s']:>9.1f} {row['steps_per_s'] / bare:>7.2f}x")
    lines.append(f"Loader, T={results['config']['window']} at 64x64")
    loader = results["loader"]
    for workers, rate in loader["windows_per_s"].items():
        lines.append(
            f"  {workers} DataLoader workers: {rate:8.0f} windows/s "
            f"({loader['megabytes_per_s'][workers]:.0f} MB/s, batch {loader['batch_size']})"
        )
    return "\n".join(lines)
