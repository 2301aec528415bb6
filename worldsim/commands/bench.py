"""`worldsim bench ...`: benchmarks that print figures and ratios (`--json` for machines)."""

from __future__ import annotations

import json
from typing import Any

import typer

from worldsim.commands.options import config_options, dict_keys, tuple_items
from worldsim.model.config import PRESETS  # torch-free: --help stays fast

BUNDLED = "bundled"  # bench rollout's preset for the shipped model (worldsim.loading.BUNDLED)
AS_JSON = typer.Option(False, "--json", help="Print the results as JSON.")

bench_app = typer.Typer(help="Benchmarks that print figures and ratios.", no_args_is_help=True)


@bench_app.command("data")
@config_options("worldsim.bench.data", "DataBenchConfig")
def bench_data(as_json: bool = AS_JSON, **fields: Any) -> None:
    """Real Memory Maze steps/s (bare vs adapter vs collection) and loader windows/s."""
    from worldsim.bench.data import DataBenchConfig, format_table, run

    results = run(DataBenchConfig(**fields))
    typer.echo(json.dumps(results, indent=2) if as_json else format_table(results))


@bench_app.command("train")
@config_options("worldsim.bench.train", "TrainBenchConfig", choices={"preset": PRESETS}, comma=("variants", "windows"))
def bench_train(as_json: bool = AS_JSON, **fields: Any) -> None:
    """Training step time and peak memory vs window length, LSSVWM vs causal attention."""
    from worldsim.bench.train import TrainBenchConfig, format_table, run

    results = run(TrainBenchConfig(**fields), progress=not as_json)
    typer.echo(json.dumps(results, indent=2) if as_json else format_table(results))


@bench_app.command("rollout")
@config_options("worldsim.bench.rollout", "RolloutBenchConfig", comma=("variants", "horizons", "batches"),
                choices={"preset": (BUNDLED, *PRESETS), "codec": dict_keys("worldsim.codec.autoencoder", "PRESETS"),
                         "decode_dtype": tuple_items("worldsim.bench.rollout", "DECODE_DTYPES"),
                         "model_dtype": tuple_items("worldsim.rollout.session", "MODEL_DTYPES"),
                         "overlap_decode": tuple_items("worldsim.bench.rollout", "OVERLAP_CHOICES")})
def bench_rollout(as_json: bool = AS_JSON, **fields: Any) -> None:
    """Where a dreamed frame's time goes (denoise, commit, decode) next to the real env's step,
    per-frame latency and state bytes vs horizon (LSSVWM vs causal KV cache), dream frames/s vs
    batch next to the real env, and a long rollout's memory. Measures the bundled model by default."""
    from worldsim.bench.rollout import RolloutBenchConfig, format_table, run

    results = run(RolloutBenchConfig(**fields), progress=not as_json)
    typer.echo(json.dumps(results, indent=2) if as_json else format_table(results))


@bench_app.command("recall")
@config_options("worldsim.bench.recall", "RecallBenchConfig", comma=("variants",))
def bench_recall(as_json: bool = AS_JSON, **fields: Any) -> None:
    """Whether a variant can learn to remember at all: a synthetic cue shown once and recalled many
    frames later, beyond every attention window (trains small models from scratch, minutes)."""
    from worldsim.bench.recall import RecallBenchConfig, format_table, run

    results = run(RecallBenchConfig(**fields), progress=not as_json)
    typer.echo(json.dumps(results, indent=2) if as_json else format_table(results))
