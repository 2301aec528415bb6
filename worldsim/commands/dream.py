"""`worldsim dream`: a trained world model rolled out from real context, written as a video."""

from __future__ import annotations

from typing import Any

import typer

from worldsim.commands.options import config_options


# No minimum= here: `dream()` checks the numbers and says "--steps must be >= 1, got -5" itself.
@config_options("worldsim.dream", "DreamConfig", helps={
    "checkpoint": "World-model run, checkpoint or bundle folder; 'bundled' or nothing: the bundled model, when installed.",
    "codec": "Codec checkpoint (default: the one the world model records).",
    "threads": "torch CPU threads while dreaming (1: one stream's ops are too small to share out; measured faster than 2).",
})
def dream(
    context: str = typer.Option("memory-maze", help="memory-maze (live env: real | dream video) or a Minari dataset id / path."),
    dataset: str | None = typer.Option(None, "--dataset", hidden=True, help="Same as --context with a dataset (the spelling other commands use)."),
    **fields: Any,
) -> None:
    """Dream with a world model from real context and write the video (real env side by side when
    there is one); prints frames/s and per-step latency."""
    from worldsim.bundled import BundleError
    from worldsim.commands.common import USER_ERRORS, fail, merge_alias
    from worldsim.dream import MEMORY_MAZE, DreamConfig, NoModelError, dream as run_dream, format_result

    context = merge_alias(context, dataset, MEMORY_MAZE, "--context", "--dataset")
    cfg = DreamConfig(context=context, **fields)
    try:
        result = run_dream(cfg, progress=True)
    except NoModelError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except BundleError as e:  # the bundled model is corrupt, or learned another maze size
        raise fail(e, 1) from None
    except (*USER_ERRORS, ImportError) as e:  # a bad option, a missing or corrupt file: one line
        raise fail(e, 2) from None
    typer.echo(format_result(result))
