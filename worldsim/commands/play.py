"""`worldsim play`: drive a trained world model's dream with the keyboard (pygame window)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from worldsim.commands.options import config_options

NO_MODEL_HELP = (
    "worldsim play needs a trained world model: pass --checkpoint <world-model checkpoint or run "
    "folder> (add --codec <codec folder> if the codec recorded in it has moved). No bundled model is "
    "installed ({where}); make one with `worldsim collect`, `worldsim train-codec`, then `worldsim train`."
)


# The viewer's settings are ViewerConfig fields; the command takes what loads the model and the
# context, and the two fields whose flags are not their names (--real, --record).
@config_options("worldsim.viewer.app", "ViewerConfig",
                minimum={"context_frames": 1, "sampler_steps": 1, "fps": 0, "scale": 1, "seed": 0, "record_fps": 0})
def play(
    checkpoint: Optional[Path] = typer.Option(  # noqa: UP007 (typer needs Optional on Python 3.11)
        None, "--checkpoint", "-c",
        help="World-model checkpoint, `worldsim train` run or bundle folder; 'bundled' or nothing: the bundled model, when installed.",
    ),
    codec: Optional[Path] = typer.Option(  # noqa: UP007
        None, help="Frame codec checkpoint (default: the one recorded in the world-model checkpoint)."
    ),
    dataset: list[str] = typer.Option(
        [], "--dataset", "-d",
        help="Minari dataset id or folder to take context clips from; repeatable "
             "(default: clips of the live Memory Maze, which also allows the real side).",
    ),
    maze_size: int = typer.Option(9, help="Memory Maze side (9, 11, 13 or 15) for the live context."),
    show_real: bool = typer.Option(True, "--real/--no-real", help="Start with the real env side by side (V toggles)."),
    agent: Optional[Path] = typer.Option(  # noqa: UP007
        None, help="Agent for agent mode (Tab): a `worldsim agent train` run or checkpoint folder, or a "
                   "Stable-Baselines3 .zip; default: a random walk."
    ),
    record_path: Optional[Path] = typer.Option(  # noqa: UP007
        None, "--record", help="Record from the start to this .mp4 or .gif (C starts/stops takes)."
    ),
    max_frames: Optional[int] = typer.Option(  # noqa: UP007
        None, min=1, help="Quit after this many frames (default: run until Esc/Q)."
    ),
    device: str = typer.Option("auto", help="Device of the model: auto (cuda when available), cpu or cuda."),
    threads: int = typer.Option(1, min=1, help="torch CPU threads (1: one stream's ops are too small to share out; measured faster than 2)."),
    **fields: Any,
) -> None:
    """Play the world model live: arrows/WASD (number keys for other games) choose the action.

    space pause, . or N single step, Tab human/agent, R new context clip, V real env side by side,
    C record, Esc/Q quit. The overlay shows fps, the model's step latency, mode, step and reward.
    """
    from worldsim.bundled import BundleError, bundle_location, bundled_model_dir, check_maze_size

    if checkpoint is not None and str(checkpoint) == "bundled":
        checkpoint = None
    if checkpoint is None:
        checkpoint = bundled_model_dir()
        if checkpoint is None:
            typer.echo(f"error: {NO_MODEL_HELP.format(where=f'looked in {bundle_location()}')}", err=True)
            raise typer.Exit(code=2)
        if not dataset:  # the live maze must be the size the bundled model learned
            try:
                check_maze_size(checkpoint, maze_size)
            except BundleError as e:
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(code=2) from None
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")  # pygame's import banner
    try:
        import pygame  # noqa: F401
    except ImportError:
        typer.echo("error: worldsim play needs pygame: pip install 'worldsim[viewer]'", err=True)
        raise typer.Exit(code=1) from None

    import torch

    from worldsim.commands.common import resolve_device
    from worldsim.loading import load_dream_model
    from worldsim.rollout.context import MinariContext
    from worldsim.envs.dream import MemoryMazeContext
    from worldsim.utils.checkpoint_folders import CheckpointError  # every checkpoint format's
    from worldsim.viewer.app import Viewer, ViewerConfig
    from worldsim.viewer.policies import load_sb3_policy

    torch.set_num_threads(threads)
    try:
        model, codec_model = load_dream_model(checkpoint, codec, device=resolve_device(device))
    except (CheckpointError, BundleError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=1) from None

    policy = None
    if agent is not None:
        try:
            policy = _load_agent_policy(agent, model.cfg.n_actions, load_sb3_policy)
        except (ValueError, FileNotFoundError, ImportError) as e:
            typer.echo(f"warning: {e}; agent mode uses a random walk instead", err=True)

    if dataset:
        context = MinariContext(dataset, fields["context_frames"])
        if show_real:
            typer.echo("note: the real side needs the live Memory Maze context; not shown with --dataset", err=True)
            show_real = False
    else:
        from worldsim.envs.memory_maze import MemoryMazeEnv
        from worldsim.envs.subprocess_env import SubprocessEnv

        # In a worker process: MuJoCo's OpenGL and pygame's window break each other in one process.
        context = MemoryMazeContext(env=SubprocessEnv(MemoryMazeEnv, size=maze_size, render_mode="rgb_array"))

    config = ViewerConfig(show_real=show_real, record_path=record_path, **fields)
    try:
        with Viewer(model, codec_model, context, config, policy=policy) as viewer:
            viewer.run(max_frames=max_frames)
    finally:
        if isinstance(context, MemoryMazeContext):
            context.close()
    for path in viewer.saved:
        typer.echo(f"saved {path}")


def _load_agent_policy(path: Path, n_actions: int, load_sb3_policy):
    """A frame -> action callable: an agent of `worldsim agent train` (run or checkpoint folder,
    safetensors + JSON) acting deterministically, or an SB3 .zip through `load_sb3_policy`."""
    from worldsim.dream import AgentCheckpointPolicy, is_agent_checkpoint

    if not is_agent_checkpoint(path):
        return load_sb3_policy(path)
    agent = AgentCheckpointPolicy(path)
    agent.check_fits(n_actions)
    return lambda frame: agent.act(frame, {})
