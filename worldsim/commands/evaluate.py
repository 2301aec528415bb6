"""`worldsim eval ...`: measure a trained world model against real data (`--json` for machines)."""

from __future__ import annotations

import json
from typing import Any

import typer

from worldsim.commands.options import config_options

eval_app = typer.Typer(help="Measure a trained world model against real data.", no_args_is_help=True)

# Options of several commands that are no config field (the sampler's settings go in as one dict).
SIGMA_MAX = typer.Option(None, help="Sampler's starting noise level (default: the dream's).")
SIGMA_MIN = typer.Option(None, help="Sampler's last noise level before 0 (default: the dream's for that many calls).")
SOLVER = typer.Option(None, help="dpm2m, euler or heun (default: the sampler's).")
CHURN = typer.Option(None, help="Fresh noise re-added before each sampler step (EDM's S_churn; 0 = none; default: the dream's).")
EXTRAPOLATION = typer.Option(None, help="Output D_N + w (D_N - D_N-1) (0 = plain D_N; default: the dream's for that many calls).")
AS_JSON = typer.Option(False, "--json", help="Print the results as JSON.")


def _sampler(sigma_max: float | None, sigma_min: float | None, solver: str | None,
             churn: float | None = None, final_extrapolation: float | None = None) -> dict | None:
    """The sampler settings given on the command line (None: the sampler's defaults), checked."""
    from worldsim.diffusion.sampler import SOLVERS

    given = (("sigma_max", sigma_max), ("sigma_min", sigma_min), ("solver", solver), ("churn", churn),
             ("final_extrapolation", final_extrapolation))
    out = {k: v for k, v in given if v is not None}
    for name in ("churn", "final_extrapolation"):
        if name in out and not out[name] >= 0:
            raise typer.BadParameter(f"must be >= 0, got {out[name]}", param_hint=f"--{name.replace('_', '-')}")
    if solver is not None and solver not in SOLVERS:
        raise typer.BadParameter(f"{solver!r} is not one of {', '.join(SOLVERS)}", param_hint="--solver")
    for name in ("sigma_max", "sigma_min"):
        if name in out and not out[name] > 0:
            raise typer.BadParameter(f"must be > 0, got {out[name]}", param_hint=f"--{name.replace('_', '-')}")
    return out or None


@eval_app.command("prediction")
@config_options("worldsim.evaluation.prediction", "PredictionEvalConfig", skip=("sampler",))
def eval_prediction(
    sigma_max: float | None = SIGMA_MAX,
    sigma_min: float | None = SIGMA_MIN,
    solver: str | None = SOLVER,
    churn: float | None = CHURN,
    final_extrapolation: float | None = EXTRAPOLATION,
    out_dir: str | None = typer.Option(None, help="Write prediction.json and prediction.png (PSNR and sharpness vs step) here."),
    as_json: bool = AS_JSON,
    **fields: Any,
) -> None:
    """1-step (teacher-forced) and open-loop prediction PSNR on real episodes, next to the codec's
    reconstruction ceiling and a copy-last-frame baseline, and each prediction's sharpness (its
    image-gradient energy as a share of the real frames')."""
    from worldsim.evaluation.prediction import PredictionEvalConfig, evaluate_prediction, format_table, write_plot

    cfg = PredictionEvalConfig(sampler=_sampler(sigma_max, sigma_min, solver, churn, final_extrapolation), **fields)
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
@config_options("worldsim.evaluation.memory", "MemoryEvalConfig")
def eval_memory(
    checkpoints: list[str] = typer.Option(..., "--checkpoint",
                                          help="LABEL=PATH of a world model (repeat: LSSVWM and each baseline)."),
    protocols: list[str] = typer.Option(["revisits", "retrieval"], "--protocol", help="revisits and/or retrieval (repeat)."),
    as_json: bool = AS_JSON,
    **fields: Any,
) -> None:
    """PSNR and SSIM of frames at places last seen longer ago than the attention window, against
    that gap, for each model (revisits recorded at collection and returns found in the poses)."""
    from worldsim.evaluation.memory import MemoryEvalConfig, evaluate_memory, format_table

    cfg = MemoryEvalConfig(checkpoints=_labelled_checkpoints(checkpoints), protocols=tuple(protocols), **fields)
    try:
        results = evaluate_memory(cfg, progress=not as_json)
    except ValueError as e:  # bad arguments or data without qualifying revisits: no traceback
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(results, indent=2) if as_json else format_table(results))


@eval_app.command("realism")
@config_options("worldsim.evaluation.realism", "RealismEvalConfig", skip=("sampler",),
                minimum={"steps": 1, "streams": 1, "context": 1, "reference_frames": 2, "sampler_steps": 1, "seed": 0})
def eval_realism(
    buckets: list[str] = typer.Option(["1-50", "100-200", "500-1000"], "--bucket",
                                      help="FIRST-LAST dreamed frames scored together (repeat)."),
    sigma_max: float | None = SIGMA_MAX,
    sigma_min: float | None = SIGMA_MIN,
    solver: str | None = SOLVER,
    churn: float | None = CHURN,
    final_extrapolation: float | None = EXTRAPOLATION,
    as_json: bool = AS_JSON,
    **fields: Any,
) -> None:
    """Sharpness (image-gradient energy vs real frames and the codec's reconstructions) and a
    Fréchet feature distance to real frames, for long random-walk dreams, by frame range."""
    from worldsim.evaluation.realism import RealismEvalConfig, evaluate_realism, format_table

    ranges = []
    for spec in buckets:
        lo, sep, hi = spec.partition("-")
        if not sep or not lo.isdigit() or not hi.isdigit():
            raise typer.BadParameter(f"{spec!r} is not FIRST-LAST, e.g. 100-200", param_hint="--bucket")
        ranges.append((int(lo), int(hi)))
    cfg = RealismEvalConfig(buckets=tuple(ranges), sampler=_sampler(sigma_max, sigma_min, solver, churn, final_extrapolation), **fields)
    try:
        results = evaluate_realism(cfg, progress=not as_json)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(results, indent=2) if as_json else format_table(results))
