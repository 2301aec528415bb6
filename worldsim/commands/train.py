"""`worldsim train`: train the world model on Minari datasets with a frozen frame codec.

Multi-GPU (or multi-process on CPU, gloo): launch this module with torchrun, e.g.
    torchrun --nproc_per_node=4 -m worldsim.commands.train --dataset D --codec C --run-dir R
Every rank runs the same command; rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import json
import os
from typing import Any

import typer

from worldsim.commands.common import bundled_or_given
from worldsim.commands.options import config_options
from worldsim.model.config import PRESETS, VARIANTS  # torch-free: --help stays fast


def _parse_overrides(items: list[str]) -> dict:
    """["n_layers=4", "attn_window=null"] -> {"n_layers": 4, "attn_window": None} (values are JSON,
    or plain strings when they are not)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


@config_options(
    "worldsim.train.trainer", "TrainConfig",
    choices={"preset": PRESETS, "variant": VARIANTS},
    minimum={"window": 3, "batch_size": 1, "steps": 1, "stop_after": 1, "warmup_steps": 1, "seed": 0, "log_every": 1,
             "checkpoint_every": 1, "sample_every": 0, "sample_count": 1, "sample_context": 1, "sample_steps": 1,
             "keep_checkpoints": 1, "num_workers": 0},
    helps={"init_from": "Warm start a new run from a bundle, checkpoint or run folder (EMA weights); 'bundled' is "
                        "the shipped model. Layers it lacks (--set prev_frames=K) start fresh."},
)  # fmt: skip
def train(
    datasets: list[str] = typer.Option(
        ..., "--dataset", "-d", help="Minari dataset id or folder; repeat for several datasets."
    ),
    model_overrides: list[str] = typer.Option(
        [], "--set", help="Override a model config field, KEY=VALUE (JSON value), e.g. --set n_layers=4."
    ),
    **fields: Any,
) -> None:
    """Train the world model on windows of Minari datasets, in the latent space of a frozen codec.

    Logs to TensorBoard (RUN_DIR/tb), writes checkpoints (safetensors + JSON) to
    RUN_DIR/checkpoints and rollout samples to RUN_DIR/samples. A killed run continues exactly
    with --resume. Several GPUs: torchrun --nproc_per_node=N -m worldsim.commands.train ...
    """
    import logging

    from rich.logging import RichHandler

    from worldsim.train.trainer import TrainConfig, TrainingDiverged
    from worldsim.train.trainer import train as run_train

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s",
        handlers=[RichHandler(show_path=False)],
    )  # fmt: skip
    fields.update(init_from=bundled_or_given(fields["init_from"], "--init-from"), progress=fields["progress"] and rank == 0)
    config = TrainConfig(datasets=tuple(datasets), model_overrides=_parse_overrides(model_overrides), **fields)
    try:
        summary = run_train(config)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # CheckpointErrors are ValueErrors
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=1) from None
    except TrainingDiverged as e:
        typer.echo(f"training diverged: {e}", err=True)
        raise typer.Exit(code=2) from None
    if rank == 0:
        last = summary.losses[-1][1] if summary.losses else float("nan")
        typer.echo(
            f"step {summary.step}: loss {last:.4f}, {summary.steps_per_second:.2f} steps/s on "
            f"{summary.world_size} rank(s); checkpoint {summary.checkpoint}"
        )


if __name__ == "__main__":  # the torchrun entry: torchrun ... -m worldsim.commands.train ...
    typer.run(train)
