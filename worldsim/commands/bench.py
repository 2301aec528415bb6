"""`worldsim bench ...`: benchmarks that print figures and ratios (`--json` for machines)."""

from __future__ import annotations

import json

import typer

from worldsim.model.config import PRESETS, VARIANTS  # torch-free: --help stays fast

PRESET_NAMES = ", ".join(PRESETS)

bench_app = typer.Typer(help="Benchmarks that print figures and ratios.", no_args_is_help=True)


@bench_app.command("data")
def bench_data(
    maze_size: int = typer.Option(9, help="Memory Maze size: 9, 11, 13 or 15."),
    env_steps: int = typer.Option(300, help="Steps timed for the bare env and the adapter."),
    collect_episodes: int = typer.Option(2, help="Episodes for the collection figure."),
    collect_steps: int = typer.Option(300, help="Steps per collected episode."),
    collect_workers: int = typer.Option(1, help="Collection worker processes."),
    window: int = typer.Option(32, help="Loader window length T."),
    loader_seconds: float = typer.Option(4.0, help="Seconds per loader measurement."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Real Memory Maze steps/s (bare vs adapter vs collection) and loader windows/s."""
    from worldsim.bench.data import DataBenchConfig, format_table, run

    cfg = DataBenchConfig(
        maze_size=maze_size,
        env_steps=env_steps,
        collect_episodes=collect_episodes,
        collect_steps=collect_steps,
        collect_workers=collect_workers,
        window=window,
        loader_seconds=loader_seconds,
    )
    results = run(cfg)
    typer.echo(json.dumps(results, indent=2) if as_json else format_table(results))


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@bench_app.command("train")
def bench_train(
    preset: str = typer.Option("tiny", help=f"Model preset: {PRESET_NAMES}."),
    variants: str = typer.Option("lssvwm,causal_full", help=f"Variants side by side, from {', '.join(VARIANTS)}."),
    windows: str = typer.Option("16,32,64,128,256", help="Window lengths T, comma-separated."),
    batch: int = typer.Option(1, help="Samples per training step."),
    steps: int = typer.Option(3, help="Timed steps per point (after a warm-up step)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    dtype: str = typer.Option("float32", help="float32, or bfloat16 (autocast on CUDA)."),
    threads: int | None = typer.Option(None, help="torch CPU threads per measurement process."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Training step time and peak memory vs window length, LSSVWM vs causal attention."""
    from worldsim.bench.train import TrainBenchConfig, format_table, run

    cfg = TrainBenchConfig(
        preset=preset,
        variants=tuple(v.strip() for v in variants.split(",")),
        windows=_int_list(windows),
        batch=batch,
        steps=steps,
        device=device,
        dtype=dtype,
        threads=threads,
    )
    results = run(cfg, progress=not as_json)
    typer.echo(json.dumps(results, indent=2) if as_json else format_table(results))


@bench_app.command("rollout")
def bench_rollout(
    preset: str = typer.Option("bundled", help="bundled: the shipped model and codec (what users get); or a model "
                                               f"preset with random weights (cost does not depend on them): {PRESET_NAMES}."),
    variants: str = typer.Option("lssvwm,causal_full", help=f"Variants side by side, from {', '.join(VARIANTS)}."),
    horizons: str = typer.Option("64,512,4096", help="Horizons (frames streamed before the timed window)."),
    timed_frames: int = typer.Option(16, help="Frames timed at each horizon."),
    sampler_steps: int = typer.Option(4, help="Denoiser calls per dreamed frame."),
    advance: str = typer.Option("auto", help="auto (fill causal_full's KV cache) or stream (every variant streams; O(h^2) for causal_full)."),
    batches: str = typer.Option("1,8,64", help="Dream vector env batch sizes (e.g. 1,8,64,256)."),
    dream_steps: int = typer.Option(8, help="Timed vector steps per batch size."),
    breakdown_steps: int = typer.Option(16, help="Timed session steps per batch size in the per-frame breakdown."),
    real_env: bool = typer.Option(True, "--real-env/--no-real-env", help="Time the real Memory Maze env too."),
    maze_size: int = typer.Option(9, help="Memory Maze size for the real env."),
    real_steps: int = typer.Option(300, help="Timed real env steps."),
    long_steps: int = typer.Option(2000, help="Frames of the long rollout (100000 for the full memory check)."),
    long_sampler_steps: int = typer.Option(1, help="Denoiser calls per frame in the long rollout."),
    long_decode: bool = typer.Option(True, "--long-decode/--no-long-decode",
                                     help="Decode every long-rollout frame to pixels (off: about half the time; "
                                          "the decoder holds no state)."),
    rss_every: int = typer.Option(500, help="Resident-set sample interval in the long rollout."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    threads: int | None = typer.Option(None, help="torch CPU threads (1 for stable numbers on a shared machine)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Where a dreamed frame's time goes (denoise, commit, decode) next to the real env's step,
    per-frame latency and state bytes vs horizon (LSSVWM vs causal KV cache), dream frames/s vs
    batch next to the real env, and a long rollout's memory. Measures the bundled model by default."""
    from worldsim.bench.rollout import RolloutBenchConfig, format_table, run

    cfg = RolloutBenchConfig(
        preset=preset,
        variants=tuple(v.strip() for v in variants.split(",")),
        horizons=_int_list(horizons),
        timed_frames=timed_frames,
        sampler_steps=sampler_steps,
        advance=advance,
        batches=_int_list(batches),
        dream_steps=dream_steps,
        breakdown_steps=breakdown_steps,
        real_env=real_env,
        maze_size=maze_size,
        real_steps=real_steps,
        long_steps=long_steps,
        long_sampler_steps=long_sampler_steps,
        long_decode=long_decode,
        rss_every=rss_every,
        device=device,
        threads=threads,
    )
    results = run(cfg, progress=not as_json)
    typer.echo(json.dumps(results, indent=2) if as_json else format_table(results))
