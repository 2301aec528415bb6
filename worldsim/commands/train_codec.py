"""`worldsim train-codec`: train the frame autoencoder the world model works on."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer


class CodecPreset(str, Enum):
    """`worldsim.codec.autoencoder.PRESETS` (a test keeps them equal; repeated here so that
    `worldsim --help` does not import torch)."""

    tiny = "tiny"
    small = "small"
    small_f4 = "small-f4"
    base = "base"


def train_codec(
    datasets: Optional[list[str]] = typer.Argument(  # noqa: UP007
        None, show_default=False,
        help="Minari dataset ids (e.g. worldsim/memory-maze-9x9-v0) or dataset folders.  [required]",
    ),
    dataset_opts: Optional[list[str]] = typer.Option(  # noqa: UP007
        None, "--dataset", "-d", hidden=True, help="Same as the DATASETS arguments (the spelling `worldsim train` uses)."
    ),
    out: Optional[Path] = typer.Option(  # noqa: UP007
        None, "--out", "-o", show_default=False, help="Run folder: checkpoints, latest.json, tb/.  [required]"
    ),
    run_dir: Optional[Path] = typer.Option(  # noqa: UP007
        None, "--run-dir", hidden=True, help="Same as --out (the spelling `worldsim train` uses)."
    ),
    preset: CodecPreset = typer.Option(
        CodecPreset.small, help="Codec size (small: 64x64x3 -> 8x8x16)."
    ),
    init_from: Optional[str] = typer.Option(  # noqa: UP007
        None, "--init-from", show_default=False,
        help="Start from this codec (checkpoint, run folder, bundle folder, or 'bundled'); its config replaces --preset.",
    ),
    decoder_only: bool = typer.Option(
        False, "--decoder-only",
        help="Train only the decoder (needs --init-from): the latent space, and world models trained on it, stay valid.",
    ),
    steps: int = typer.Option(20_000, min=1, help="Training steps (the LR schedule spans them)."),
    stop_after: Optional[int] = typer.Option(  # noqa: UP007 (typer needs Optional on Python 3.11)
        None, min=1, help="Checkpoint and stop at this step; --resume later to go on."
    ),
    batch_size: int = typer.Option(32, min=1, help="Frames per step."),
    lr: float = typer.Option(1e-3, min=0.0, help="Peak AdamW learning rate."),
    val_episodes: int = typer.Option(1, min=1, help="Episodes held out per dataset for PSNR."),
    eval_every: int = typer.Option(500, min=1, help="Steps between held-out PSNR evaluations."),
    checkpoint_every: int = typer.Option(500, min=1, help="Steps between checkpoints."),
    seed: int = typer.Option(0, min=0, help="Seed of the weights, batch order and augmentation."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    num_workers: int = typer.Option(0, min=0, help="DataLoader worker processes."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train the frame codec (autoencoder) on dataset frames and report held-out PSNR.

    The last episodes of each dataset are never trained on; the PSNR printed is measured on them.
    Load the result with `worldsim.codec.checkpoint.load_codec(OUT)`.
    """
    from worldsim.commands.common import merge_alias

    datasets = [*(datasets or []), *(dataset_opts or [])]
    if not datasets:
        raise typer.BadParameter("give at least one dataset id or folder", param_hint="DATASETS")
    out = merge_alias(out, run_dir, None, "--out", "--run-dir")
    if out is None:
        raise typer.BadParameter("missing: the run folder to write", param_hint="'--out' / '-o'")

    from worldsim.codec.checkpoint import CheckpointError
    from worldsim.codec.train import CodecTrainConfig, TrainingDiverged
    from worldsim.codec.train import train_codec as run_training
    from worldsim.data.episode_store import DatasetError

    if init_from == "bundled":
        from worldsim.bundled import bundled_model_dir

        found = bundled_model_dir()
        if found is None:
            typer.echo("error: --init-from bundled: no bundled model is installed", err=True)
            raise typer.Exit(code=1)
        init_from = str(found)
    config = CodecTrainConfig(
        datasets=tuple(datasets), run_dir=str(out), preset=preset.value, steps=steps,
        init_from=init_from, decoder_only=decoder_only,
        stop_after=stop_after, batch_size=batch_size, lr=lr, val_episodes=val_episodes,
        eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed, device=device,
        num_workers=num_workers, progress=progress,
    )  # fmt: skip
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
