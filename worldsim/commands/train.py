"""`worldsim train`: train the world model on Minari datasets with a frozen frame codec.

Multi-GPU (or multi-process on CPU, gloo): launch this module with torchrun, e.g.
    torchrun --nproc_per_node=4 -m worldsim.commands.train --dataset D --codec C --run-dir R
Every rank runs the same command; rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

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


def _init_source(value: str | None) -> str | None:
    """'bundled' -> the shipped bundle's folder; anything else as given."""
    if value != "bundled":
        return value
    from worldsim.bundled import bundled_model_dir

    folder = bundled_model_dir()
    if folder is None:
        raise typer.BadParameter("no bundled model is installed", param_hint="--init-from")
    return str(folder)


def train(
    dataset: list[str] = typer.Option(
        ..., "--dataset", "-d", help="Minari dataset id or folder; repeat for several datasets."
    ),
    codec: Path = typer.Option(
        ..., help="Frame codec checkpoint folder or `worldsim train-codec` run folder."
    ),
    run_dir: Path = typer.Option(Path("runs/world-model"), help="Run folder (checkpoints, TensorBoard)."),
    preset: str = typer.Option("tiny", help=f"Model size: {', '.join(PRESETS)} (cpu: small made fast to train on a CPU)."),
    variant: str = typer.Option(
        "lssvwm", help=f"{VARIANTS[0]}, or a baseline: {', '.join(VARIANTS[1:])}."
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a model config field, KEY=VALUE (JSON value), e.g. --set n_layers=4."
    ),
    window: int = typer.Option(16, min=3, help="Frames per training window."),
    batch_size: int = typer.Option(8, min=1, help="Windows per step on each rank."),
    steps: int = typer.Option(10_000, min=1, help="Total optimisation steps (the LR schedule spans them)."),
    stop_after: Optional[int] = typer.Option(  # noqa: UP007 (typer needs Optional on Python 3.11)
        None, min=1, help="Checkpoint and stop at this step in this session."
    ),
    lr: float = typer.Option(3e-4, help="Peak learning rate (warmup, then cosine decay)."),
    min_lr_ratio: float = typer.Option(0.1, help="Final learning rate / peak."),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay of matrices."),
    warmup_steps: int = typer.Option(200, min=1, help="Linear warmup steps."),
    grad_clip: float = typer.Option(1.0, help="Max gradient norm."),
    ema_decay: float = typer.Option(0.999, help="EMA decay of the weights used for samples."),
    noise_mean: float = typer.Option(0.3, help="Mean of ln(sigma) of the training noise levels."),
    noise_std: float = typer.Option(1.2, help="Std of ln(sigma) of the training noise levels."),
    p_long_context: float = typer.Option(0.5, help="Probability of a clean prefix (> half the window) per window."),
    seed: int = typer.Option(0, min=0, help="Seeds weights, window order and noise."),
    log_every: int = typer.Option(10, min=1, help="Steps between TensorBoard scalars."),
    checkpoint_every: int = typer.Option(1000, min=1, help="Steps between checkpoints."),
    sample_every: int = typer.Option(1000, min=0, help="Steps between rollout samples (0: none)."),
    keep_checkpoints: int = typer.Option(3, min=1, help="Newest checkpoints kept."),
    resume: bool = typer.Option(False, help="Continue the run in --run-dir from its latest checkpoint."),
    init_from: Optional[str] = typer.Option(  # noqa: UP007
        None, help="Warm start a new run from a bundle, checkpoint or run folder (EMA weights); "
        "'bundled' is the shipped model. Layers it lacks (--set prev_frames=K) start fresh.",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda (torchrun: each rank its LOCAL_RANK GPU)."),
    bf16: bool = typer.Option(False, help="bf16 autocast (CUDA only)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (CUDA only)."),
    num_workers: int = typer.Option(0, min=0, help="DataLoader worker processes."),
    latent_cache: bool = typer.Option(
        True, help="Encode each episode once into RUN_DIR/latents (keyed by the codec) and train on "
        "those latents; --no-latent-cache encodes every batch's frames at every step.",
    ),
    progress: bool = typer.Option(True, help="Show a progress bar."),
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
    config = TrainConfig(
        datasets=tuple(dataset), codec=str(codec), run_dir=str(run_dir), preset=preset, variant=variant,
        model_overrides=_parse_overrides(set_), window=window, batch_size=batch_size, steps=steps,
        stop_after=stop_after, lr=lr, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
        warmup_steps=warmup_steps, grad_clip=grad_clip, ema_decay=ema_decay, noise_mean=noise_mean, noise_std=noise_std, p_long_context=p_long_context, seed=seed,
        log_every=log_every, checkpoint_every=checkpoint_every, sample_every=sample_every,
        keep_checkpoints=keep_checkpoints, resume=resume, init_from=_init_source(init_from), device=device, bf16=bf16, compile=compile,
        num_workers=num_workers, latent_cache=latent_cache, progress=progress and rank == 0,
    )  # fmt: skip
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
