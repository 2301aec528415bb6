"""`worldsim dream`: a trained world model rolled out from real context, written as a video."""

from __future__ import annotations

import typer


def dream(
    checkpoint: str | None = typer.Option(None, help="World-model run, checkpoint or bundle folder; 'bundled' or nothing: the bundled model, when installed."),
    codec: str | None = typer.Option(None, help="Codec checkpoint (default: the one the world model records)."),
    context: str = typer.Option("memory-maze", help="memory-maze (live env: real | dream video) or a Minari dataset id / path."),
    dataset: str | None = typer.Option(None, "--dataset", hidden=True, help="Same as --context with a dataset (the spelling other commands use)."),
    maze_size: int = typer.Option(9, help="Memory Maze size for the live context."),
    context_frames: int = typer.Option(9, help="Real frames prefilled before dreaming."),
    policy: str = typer.Option("random", help="random, scripted (live maze only), an agent folder of `worldsim agent train` or a Stable-Baselines3 .zip."),
    steps: int = typer.Option(100, help="Frames to dream."),
    out: str = typer.Option("dream.mp4", help="Video file, .mp4 or .gif."),
    seed: int = typer.Option(0, help="Fixes the context, the policy and the sampler noise."),
    sampler_steps: int = typer.Option(3, help="Denoiser calls per frame."),
    fps: int = typer.Option(8, help="Video playback frames per second."),
    scale: int = typer.Option(4, help="Integer upscale of the 64x64 frames in the video."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    threads: int = typer.Option(1, help="torch CPU threads (1: one stream's ops are too small to share out; measured faster than 2)."),
) -> None:
    """Dream with a world model from real context and write the video (real env side by side when
    there is one); prints frames/s and per-step latency."""
    from worldsim.bundled import BundleError
    from worldsim.commands.common import USER_ERRORS, fail, merge_alias
    from worldsim.dream import MEMORY_MAZE, DreamConfig, NoModelError, dream as run_dream, format_result

    context = merge_alias(context, dataset, MEMORY_MAZE, "--context", "--dataset")

    cfg = DreamConfig(checkpoint=checkpoint, codec=codec, context=context, maze_size=maze_size,
                      context_frames=context_frames, policy=policy, steps=steps, out=out, seed=seed,
                      sampler_steps=sampler_steps, fps=fps, scale=scale, device=device, threads=threads)
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
