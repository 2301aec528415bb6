"""`worldsim bench ...`: benchmarks that print figures and ratios (`--json` for machines)."""

from __future__ import annotations

import json

import typer

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
