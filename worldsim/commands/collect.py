"""`worldsim collect`: run exploration policies in a real env and write a Minari dataset."""

from __future__ import annotations

from typing import Any, Optional

import typer

from worldsim.commands.options import config_defaults, config_options, tuple_items

DEFAULTS = config_defaults("worldsim.collect", "CollectConfig")


# The hidden aliases are the command's own; every other option is a CollectConfig field.
@config_options("worldsim.collect", "CollectConfig", minimum={"episodes": 1, "workers": 1, "max_steps": 1, "seed": 0},
                choices={"policy": tuple_items("worldsim.collect", "POLICY_CHOICES")},
                short={"env_id": "-e", "policy": "-p", "episodes": "-n", "dataset_id": "-d"})
def collect(
    env_alias: Optional[str] = typer.Option(  # noqa: UP007 (typer needs Optional on Python 3.11)
        None, "--env", hidden=True, help="Same as --env-id (the spelling `worldsim agent` uses)."
    ),
    dataset_alias: Optional[str] = typer.Option(  # noqa: UP007
        None, "--dataset", hidden=True, help="Same as --dataset-id (the spelling `worldsim train` uses)."
    ),
    **fields: Any,
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

    fields["env_id"] = merge_alias(fields["env_id"], env_alias, DEFAULTS["env_id"], "--env-id", "--env")
    dataset_id = fields["dataset_id"] = merge_alias(fields["dataset_id"], dataset_alias, DEFAULTS["dataset_id"],
                                                    "--dataset-id", "--dataset")
    config = CollectConfig(**fields)
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
    if config.root is not None:
        load = f"MINARI_DATASETS_PATH={config.root} then {load}"
    typer.echo(f"load it with: {load}")
