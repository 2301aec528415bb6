"""`worldsim eval ...`: measure a trained world model against real data (`--json` for machines)."""

from __future__ import annotations

import json

import typer

eval_app = typer.Typer(help="Measure a trained world model against real data.", no_args_is_help=True)


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
    seed: int = typer.Option(0, help="Fixes the start points and the sampler noise."),
    batch_size: int = typer.Option(64, help="Windows streamed together (memory only; results do not depend on it)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """1-step (teacher-forced) and open-loop prediction PSNR on real episodes, next to the codec's
    reconstruction ceiling and a copy-last-frame baseline."""
    from worldsim.evaluation.prediction import PredictionEvalConfig, evaluate_prediction, format_table

    cfg = PredictionEvalConfig(checkpoint=checkpoint, dataset=dataset, codec=codec, episodes=episodes,
                               context=context, horizon=horizon, starts_per_episode=starts_per_episode,
                               sampler_steps=sampler_steps, seed=seed, batch_size=batch_size, device=device)
    try:
        results = evaluate_prediction(cfg, progress=not as_json)
    except ValueError as e:  # bad arguments or a dataset that does not fit the model: no traceback
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(results, indent=2) if as_json else format_table(results))
