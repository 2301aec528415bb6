"""`worldsim eval ...`: measure a trained world model against real data (`--json` for machines)."""

from __future__ import annotations

import json

import typer

eval_app = typer.Typer(help="Measure a trained world model against real data.", no_args_is_help=True)


def _sampler(sigma_max: float | None, sigma_min: float | None, solver: str | None) -> dict | None:
    """The sampler settings given on the command line (None: the sampler's defaults), checked."""
    from worldsim.diffusion.sampler import SOLVERS

    out = {k: v for k, v in (("sigma_max", sigma_max), ("sigma_min", sigma_min), ("solver", solver)) if v is not None}
    if solver is not None and solver not in SOLVERS:
        raise typer.BadParameter(f"{solver!r} is not one of {', '.join(SOLVERS)}", param_hint="--solver")
    for name in ("sigma_max", "sigma_min"):
        if name in out and not out[name] > 0:
            raise typer.BadParameter(f"must be > 0, got {out[name]}", param_hint=f"--{name.replace('_', '-')}")
    return out or None


@eval_app.command("prediction")
def eval_prediction(
    checkpoint: str = typer.Option(..., help="World-model run or checkpoint folder."),
    dataset: str = typer.Option(..., help="Minari dataset id or path with held-out episodes."),
    codec: str | None = typer.Option(None, help="Codec checkpoint (default: the one the world model records)."),
    episodes: int | None = typer.Option(None, help="Evaluate the first N episodes (default: all)."),
    context: int = typer.Option(9, help="Real frames prefilled before predicting."),
    horizon: int = typer.Option(16, help="Frames predicted after the context."),
    starts_per_episode: int = typer.Option(4, help="Random start points per episode."),
    sampler_steps: int = typer.Option(4, help="Denoiser calls per predicted frame."),
    sigma_max: float | None = typer.Option(None, help="Sampler's starting noise level (default: the sampler's)."),
    sigma_min: float | None = typer.Option(None, help="Sampler's last noise level before 0 (default: the sampler's)."),
    solver: str | None = typer.Option(None, help="dpm2m, euler or heun (default: the sampler's)."),
    seed: int = typer.Option(0, help="Fixes the start points and the sampler noise."),
    batch_size: int = typer.Option(64, help="Windows streamed together (memory only; results do not depend on it)."),
    out_dir: str | None = typer.Option(None, help="Write prediction.json and prediction.png (PSNR vs step) here."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """1-step (teacher-forced) and open-loop prediction PSNR on real episodes, next to the codec's
    reconstruction ceiling and a copy-last-frame baseline."""
    from worldsim.evaluation.prediction import PredictionEvalConfig, evaluate_prediction, format_table, write_plot

    cfg = PredictionEvalConfig(checkpoint=checkpoint, dataset=dataset, codec=codec, episodes=episodes,
                               context=context, horizon=horizon, starts_per_episode=starts_per_episode,
                               sampler_steps=sampler_steps, sampler=_sampler(sigma_max, sigma_min, solver), seed=seed,
                               batch_size=batch_size, device=device)
    try:
        results = evaluate_prediction(cfg, progress=not as_json)
    except ValueError as e:  # bad arguments or a dataset that does not fit the model: no traceback
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if out_dir is not None:
        write_plot(results, out_dir)
    typer.echo(json.dumps(results, indent=2) if as_json else format_table(results))


def _labelled_checkpoints(specs: list[str]) -> dict[str, str]:
    """["lssvwm=runs/a", "runs/b"] -> {"lssvwm": "runs/a", "b": "runs/b"} (a bare path is labelled by its folder)."""
    from pathlib import Path

    out: dict[str, str] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).name, spec
        if not label or not path or label in out:
            raise typer.BadParameter(f"checkpoint {spec!r}: expected distinct LABEL=PATH entries")
        out[label] = path
    return out


@eval_app.command("memory")
def eval_memory(
    checkpoint: list[str] = typer.Option(..., help="LABEL=PATH of a world model (repeat: LSSVWM and each baseline)."),
    dataset: str = typer.Option(..., help="Minari dataset id or path with held-out episodes."),
    protocol: list[str] = typer.Option(["revisits", "retrieval"], help="revisits and/or retrieval (repeat)."),
    episodes: int | None = typer.Option(None, help="Evaluate the first N episodes (default: all)."),
    context: int = typer.Option(200, help="Real frames before the revisit; the earlier visit must lie within."),
    horizon: int = typer.Option(8, help="Frames dreamed open loop from the revisit on."),
    min_gap: int | None = typer.Option(None, help="Targets need gap > this (default: the widest attention window)."),
    max_targets: int | None = typer.Option(None, help="Seeded subset of at most N targets per protocol."),
    sampler_steps: int = typer.Option(4, help="Denoiser calls per dreamed frame."),
    seed: int = typer.Option(0, help="Fixes the target subset and the sampler noise."),
    batch_size: int = typer.Option(16, help="Targets streamed together (memory only)."),
    out_dir: str | None = typer.Option(None, help="Write memory.json and PNG plots here."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """PSNR and SSIM of frames at places last seen longer ago than the attention window, against
    that gap, for each model (revisits recorded at collection and returns found in the poses)."""
    from worldsim.evaluation.memory import MemoryEvalConfig, evaluate_memory, format_table

    cfg = MemoryEvalConfig(checkpoints=_labelled_checkpoints(checkpoint), dataset=dataset,
                           protocols=tuple(protocol), episodes=episodes, context=context, horizon=horizon,
                           min_gap=min_gap, max_targets=max_targets, sampler_steps=sampler_steps, seed=seed,
                           batch_size=batch_size, out_dir=out_dir, device=device)
    try:
        results = evaluate_memory(cfg, progress=not as_json)
    except ValueError as e:  # bad arguments or data without qualifying revisits: no traceback
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(results, indent=2) if as_json else format_table(results))


@eval_app.command("realism")
def eval_realism(
    checkpoint: str = typer.Option(..., help="World-model run, checkpoint or bundle folder."),
    dataset: str = typer.Option(..., help="Minari dataset id or path with held-out episodes (context and reference frames)."),
    codec: str | None = typer.Option(None, help="Codec checkpoint (default: the one the world model records)."),
    steps: int = typer.Option(1000, min=1, help="Frames dreamed per stream."),
    streams: int = typer.Option(8, min=1, help="Dreams run side by side."),
    context: int = typer.Option(9, min=1, help="Real frames prefilled before dreaming."),
    bucket: list[str] = typer.Option(["1-50", "100-200", "500-1000"], help="FIRST-LAST dreamed frames scored together (repeat)."),
    reference_frames: int = typer.Option(2000, min=2, help="Real frames in the reference pool."),
    sampler_steps: int = typer.Option(4, min=1, help="Denoiser calls per dreamed frame."),
    sigma_max: float | None = typer.Option(None, help="Sampler's starting noise level (default: the sampler's)."),
    sigma_min: float | None = typer.Option(None, help="Sampler's last noise level before 0 (default: the sampler's)."),
    solver: str | None = typer.Option(None, help="dpm2m, euler or heun (default: the sampler's)."),
    seed: int = typer.Option(0, min=0, help="Fixes start points, actions and sampler noise."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Sharpness (image-gradient energy vs real frames and the codec's reconstructions) and a
    Fréchet feature distance to real frames, for long random-walk dreams, by frame range."""
    from worldsim.evaluation.realism import RealismEvalConfig, evaluate_realism, format_table

    buckets = []
    for spec in bucket:
        lo, sep, hi = spec.partition("-")
        if not sep or not lo.isdigit() or not hi.isdigit():
            raise typer.BadParameter(f"{spec!r} is not FIRST-LAST, e.g. 100-200", param_hint="--bucket")
        buckets.append((int(lo), int(hi)))
    cfg = RealismEvalConfig(checkpoint=checkpoint, dataset=dataset, codec=codec, steps=steps, streams=streams,
                            context=context, buckets=tuple(buckets), reference_frames=reference_frames,
                            sampler_steps=sampler_steps, sampler=_sampler(sigma_max, sigma_min, solver), seed=seed,
                            device=device)
    try:
        results = evaluate_realism(cfg, progress=not as_json)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(results, indent=2) if as_json else format_table(results))
