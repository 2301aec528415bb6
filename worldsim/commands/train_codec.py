"""`worldsim train-codec`: train the frame autoencoder the world model works on."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from worldsim.commands.options import choice_enum, config_options, dict_keys


# The codec presets, read from worldsim.codec.autoencoder's source (importing it imports torch).
CodecPreset = choice_enum("CodecPreset", dict_keys("worldsim.codec.autoencoder", "PRESETS"))


@config_options(
    "worldsim.codec.train", "CodecTrainConfig", skip=("codec",), choices={"preset": CodecPreset},
    minimum={"steps": 1, "stop_after": 1, "batch_size": 1, "lr": 0.0, "val_episodes": 1, "val_frames": 1,
             "stats_frames": 1, "eval_every": 1, "checkpoint_every": 1, "log_every": 1, "keep_checkpoints": 1,
             "seed": 0, "num_workers": 0, "texture_weight": 0.0, "edge_weight": 0.0},
    helps={"init_from": "Start from this codec (checkpoint, run folder, bundle folder, or 'bundled'); its config "
                        "replaces --preset."},
)  # fmt: skip
def train_codec(
    datasets: Optional[list[str]] = typer.Argument(  # noqa: UP007
        None, show_default=False,
        help="Minari dataset ids (e.g. worldsim/memory-maze-9x9-v0) or dataset folders.  [required]",
    ),
    dataset_opts: Optional[list[str]] = typer.Option(  # noqa: UP007
        None, "--dataset", "-d", hidden=True, help="Same as the DATASETS arguments (the spelling `worldsim train` uses)."
    ),
    run_dir: Optional[Path] = typer.Option(  # noqa: UP007
        None, "--out", "-o", show_default=False, help="Run folder: checkpoints, latest.json, tb/.  [required]"
    ),
    run_dir_alias: Optional[Path] = typer.Option(  # noqa: UP007
        None, "--run-dir", hidden=True, help="Same as --out (the spelling `worldsim train` uses)."
    ),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    **fields: Any,
) -> None:
    """Train the frame codec (autoencoder) on dataset frames and report held-out PSNR.

    The last episodes of each dataset are never trained on; the PSNR printed is measured on them.
    Load the result with `worldsim.codec.checkpoint.load_codec(OUT)`.
    """
    from worldsim.commands.common import bundled_or_given, merge_alias

    datasets = [*(datasets or []), *(dataset_opts or [])]
    if not datasets:
        raise typer.BadParameter("give at least one dataset id or folder", param_hint="DATASETS")
    out = merge_alias(run_dir, run_dir_alias, None, "--out", "--run-dir")
    if out is None:
        raise typer.BadParameter("missing: the run folder to write", param_hint="'--out' / '-o'")

    from worldsim.codec.checkpoint import CheckpointError
    from worldsim.codec.train import CodecTrainConfig, TrainingDiverged
    from worldsim.codec.train import train_codec as run_training
    from worldsim.data.episode_store import DatasetError

    fields["init_from"] = bundled_or_given(fields["init_from"], "--init-from")
    config = CodecTrainConfig(datasets=tuple(datasets), run_dir=str(out), **fields)
    try:
        result = run_training(config, resume=resume)
    except (ValueError, DatasetError, CheckpointError, FileExistsError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=1) from None
    except TrainingDiverged as e:
        typer.echo(f"training diverged: {e}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(
        f"step {result.step}: held-out PSNR {result.val_psnr:.2f} dB "
        f"({result.train_seconds / 60:.1f} min of training); checkpoint {result.checkpoint}"
    )
