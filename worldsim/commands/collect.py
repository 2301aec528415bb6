"""`worldsim collect`: run exploration policies in a real env and write a Minari dataset."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

DEFAULT_ENV_ID = "worldsim/MemoryMaze-9x9-v0"
DEFAULT_DATASET_ID = "worldsim/memory-maze-9x9-v0"


class PolicyChoice(str, Enum):
    """`worldsim.collect.POLICY_CHOICES` (a test keeps them equal; repeated here so that
    `worldsim --help` does not import numpy, gymnasium and Minari)."""

    random = "random"
    navigator = "navigator"
    revisit = "revisit"
    spin = "spin"
    mixed = "mixed"


def collect(
    env_id: str = typer.Option(
        DEFAULT_ENV_ID, "--env-id", "-e",
        help="Gymnasium id: worldsim/MemoryMaze-{9x9,11x11,13x13,15x15}-v0 or worldsim/Crafter-v0.",
    ),
    env_alias: Optional[str] = typer.Option(  # noqa: UP007
        None, "--env", hidden=True, help="Same as --env-id (the spelling `worldsim agent` uses)."
    ),
    policy: PolicyChoice = typer.Option(
        PolicyChoice.mixed, "--policy", "-p",
        help="random (any env); navigator, revisit, spin (Memory Maze); mixed: one per episode of random, navigator, revisit.",
    ),
    episodes: int = typer.Option(
        10, "--episodes", "-n", min=1, help="Episodes the dataset should hold."
    ),
    workers: int = typer.Option(2, min=1, help="Worker processes (one env each)."),
    max_steps: Optional[int] = typer.Option(  # noqa: UP007 (typer needs Optional on Python 3.11)
        None, min=1, help="Cut episodes after this many steps (default: the env's own limit)."
    ),
    seed: int = typer.Option(0, min=0, help="Episode i uses env and policy seed SEED + i."),
    dataset_id: str = typer.Option(
        DEFAULT_DATASET_ID, "--dataset-id", "-d",
        help="Minari id to create or resume, e.g. worldsim/memory-maze-9x9-v0 (namespace/name-vN).",
    ),
    dataset_alias: Optional[str] = typer.Option(  # noqa: UP007
        None, "--dataset", hidden=True, help="Same as --dataset-id (the spelling `worldsim train` uses)."
    ),
    root: Optional[Path] = typer.Option(  # noqa: UP007
        None, help="Datasets folder (default: MINARI_DATASETS_PATH or ~/.minari/datasets)."
    ),
    description: str = typer.Option("", help="Description stored in the dataset's metadata."),
    code_permalink: Optional[str] = typer.Option(  # noqa: UP007
        None, help="Link to the code that made the dataset, stored as Minari's code_permalink "
                   "(default: $WORLDSIM_CODE_PERMALINK, else a placeholder).",
    ),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Run exploration policies in a real env and write the episodes as a Minari dataset.

    Frames, actions, rewards, terminations, truncations and the env's per-step info (agent pose,
    targets...) are stored; each episode's metadata holds its seed, policy, revisit step pairs
    and, for Memory Maze, the maze layout.

    Running the same command again resumes: only missing episodes are collected. Ctrl-C keeps
    every committed episode.
    """
    from worldsim.collect import (
        CollectConfig,
        CollectionError,
        CollectionInterrupted,
    )
    from worldsim.commands.common import merge_alias
    from worldsim.collect import collect as run_collect

    env_id = merge_alias(env_id, env_alias, DEFAULT_ENV_ID, "--env-id", "--env")
    dataset_id = merge_alias(dataset_id, dataset_alias, DEFAULT_DATASET_ID, "--dataset-id", "--dataset")
    config = CollectConfig(
        env_id=env_id, policy=policy.value, episodes=episodes, workers=workers,
        max_steps=max_steps, seed=seed, dataset_id=dataset_id,
        root=None if root is None else str(root), description=description, progress=progress,
        code_permalink=code_permalink,
    )  # fmt: skip
    try:
        summary = run_collect(config)
    except (ValueError, CollectionError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=1) from None
    except CollectionInterrupted as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=130) from None

    typer.echo(
        f"{dataset_id}: {summary.episodes_written} episodes written "
        f"({summary.steps_written} steps, {summary.steps_per_second:.1f} steps/s), "
        f"{summary.episodes_skipped} already present; it holds {summary.episodes_in_dataset} "
        f"episodes at {summary.path}"
    )
    load = f"minari.load_dataset({dataset_id!r})"
    if root is not None:
        load = f"MINARI_DATASETS_PATH={root} then {load}"
    typer.echo(f"load it with: {load}")
