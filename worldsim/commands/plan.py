"""`worldsim plan`: MPC in the live Memory Maze with a planner in the dream, against random actions."""

from __future__ import annotations

import json
from typing import Any

import typer

from worldsim.commands.options import config_options, tuple_items


# The planner's settings are PlannerConfig fields; the command takes the rest (and elites, whose
# default follows --candidates) itself. goal_weight is skipped: the command sets no goal image.
@config_options("worldsim.agents.planners", "PlannerConfig", skip=("goal_weight",),
                choices={"model_dtype": tuple_items("worldsim.rollout.session", "MODEL_DTYPES")})
def plan(
    checkpoint: str | None = typer.Option(None, help="World-model run, checkpoint or bundle folder; 'bundled' or nothing: the bundled model, when installed."),
    codec: str | None = typer.Option(None, help="Codec checkpoint (default: the one the world model records)."),
    planner: str = typer.Option("cem", help="cem, mppi or random-shooting."),
    elites: int | None = typer.Option(None, help="CEM: sequences the distributions are refit to (default: candidates / 8, at least 1)."),
    steps: int = typer.Option(100, help="Real steps controlled per episode."),
    episodes: int = typer.Option(1, help="Real episodes (each also run with random actions)."),
    context_frames: int = typer.Option(9, help="Real frames (random actions) prefilled before planning."),
    maze_size: int = typer.Option(9, help="Memory Maze size."),
    seed: int = typer.Option(0, help="Fixes the mazes, the context and the planners' sampling."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    **fields: Any,
) -> None:
    """Plan in the dream, act in the real maze, feed the real frames back; prints return vs random
    actions and the planning time per decision."""
    import torch

    from worldsim.agents.mpc import compare_with_random
    from worldsim.agents.planners import PlannerConfig, make_planner
    from worldsim.commands.common import USER_ERRORS, existing_path, fail, resolve_device
    from worldsim.loading import BUNDLED, load_dream_model, resolve_dream_checkpoint
    from worldsim.envs.memory_maze import MemoryMazeEnv

    try:  # every setting is checked before the model and the MuJoCo env are built
        cfg = PlannerConfig(elites=elites if elites is not None else max(1, fields["candidates"] // 8), **fields)
        chosen = make_planner(planner, cfg)
        for name, value in (("steps", steps), ("episodes", episodes), ("context-frames", context_frames)):
            if value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if checkpoint not in (None, BUNDLED):
            existing_path(checkpoint, "--checkpoint")
        if codec is not None:
            existing_path(codec, "--codec")
        path = resolve_dream_checkpoint(checkpoint, maze_size)
    except (ValueError, FileNotFoundError) as e:
        raise fail(e, 2) from None

    dev = torch.device(resolve_device(device))
    try:  # a corrupt checkpoint or codec, a codec that does not fit: one line naming the file
        model, frame_codec = load_dream_model(path, codec, device=dev)
    except USER_ERRORS as e:
        raise fail(e, 1) from None
    env = MemoryMazeEnv(size=maze_size)
    try:
        result = compare_with_random(env, model, frame_codec, chosen, episodes, steps, context_frames, seed)
    except (ValueError, MemoryError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    finally:
        env.close()
    result["settings"] = {"planner": planner, "horizon": cfg.horizon, "candidates": cfg.candidates,
                          "iterations": cfg.iterations, "sampler_steps": cfg.sampler_steps, "seed": seed}
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    p, r = result["planner"], result["random"]
    typer.echo(f"{planner}: mean return {sum(p['returns']) / len(p['returns']):.2f} "
               f"over {episodes} episode(s) of {steps} steps, {p['ms_per_decision']:.1f} ms per decision")
    typer.echo(f"random: mean return {sum(r['returns']) / len(r['returns']):.2f}")
