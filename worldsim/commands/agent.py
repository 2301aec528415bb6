"""`worldsim agent train|eval`: SB3 agents trained in the dream (or the real maze), scored in the real maze."""

from __future__ import annotations

import json

import typer

agent_app = typer.Typer(help="Train agents in imagination and score them in the real Memory Maze.", no_args_is_help=True)
DEFAULT_ENV_ID = "worldsim/MemoryMaze-9x9-v0"


def _hyperparameters(pairs: list[str]) -> dict:
    """["n_steps=64", "gamma=0.95", "foo=bar"] -> {"n_steps": 64, "gamma": 0.95, "foo": "bar"} (JSON values, else strings)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--hparam {pair!r}: expected KEY=VALUE, e.g. --hparam n_steps=64")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2)


@agent_app.command("train")
def agent_train(
    run_dir: str = typer.Option(..., help="Folder for checkpoints, latest.json and TensorBoard logs."),
    world: str = typer.Option("dream", help="dream (the world model's imagination) or real (the real Memory Maze)."),
    checkpoint: str | None = typer.Option(None, help="World model: run, checkpoint or bundle folder; 'bundled' or nothing: the bundled model."),
    codec: str | None = typer.Option(None, help="Codec checkpoint (default: the one the world model records)."),
    dataset: str | None = typer.Option(None, help="Minari dataset for dream contexts (default: random walks in the real maze)."),
    env: str = typer.Option(DEFAULT_ENV_ID, help="The real maze: trained in (--world real) and evaluated in."),
    env_alias: str | None = typer.Option(None, "--env-id", hidden=True, help="Same as --env (the spelling `worldsim collect` uses)."),
    algo: str = typer.Option("ppo", help="ppo, a2c or dqn."),
    policy: str = typer.Option("CnnPolicy", help="SB3 policy alias."),
    hparam: list[str] = typer.Option([], help="Algorithm hyper-parameter KEY=VALUE (repeat), e.g. n_steps=64."),
    steps: int = typer.Option(10_000, help="Total env steps (a resumed run trains until it has this many)."),
    num_envs: int = typer.Option(8, help="Parallel dream streams (one model batch) or real mazes."),
    horizon: int = typer.Option(100, help="Training episode length in steps, dream and real alike."),
    sampler_steps: int = typer.Option(3, help="Dream: denoiser calls per dreamed frame."),
    context_frames: int = typer.Option(9, help="Dream: real frames prefilled before each dreamed episode."),
    context_mazes: int = typer.Option(8, help="Dream: real mazes randomly walked once for context clips."),
    eval_every: int = typer.Option(5_000, help="Evaluate in the real maze every N env steps (0: only at the end)."),
    eval_episodes: int = typer.Option(5, help="Real episodes per evaluation (0: no evaluation)."),
    eval_max_steps: int = typer.Option(1_000, help="Steps per evaluation episode."),
    eval_seed: int = typer.Option(10_000, help="Evaluation episode i plays maze seed eval_seed + i."),
    checkpoint_every: int | None = typer.Option(None, help="Checkpoint every N env steps (default: --eval-every)."),
    seed: int = typer.Option(0, help="Seeds SB3 and the envs."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, help="Continue the run's latest checkpoint."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train an SB3 agent in the dream (or the real maze), evaluating it in the real maze as it learns."""
    from worldsim.agents.imagination import AgentTrainConfig, train_agent
    from worldsim.commands.common import merge_alias

    env = merge_alias(env, env_alias, DEFAULT_ENV_ID, "--env", "--env-id")
    try:
        cfg = AgentTrainConfig(
            run_dir=run_dir, world=world, env_id=env, checkpoint=checkpoint, codec=codec, dataset=dataset,
            context_mazes=context_mazes, algo=algo, policy=policy, hyperparameters=_hyperparameters(hparam),
            steps=steps, num_envs=num_envs, horizon=horizon, context_frames=context_frames,
            sampler_steps=sampler_steps, eval_every=eval_every, eval_episodes=eval_episodes,
            eval_max_steps=eval_max_steps, eval_seed=eval_seed, checkpoint_every=checkpoint_every, seed=seed,
            device=device, progress=progress,
        )
        result = train_agent(cfg, resume=resume)
    except ValueError as e:  # bad settings, unknown names, mismatched checkpoints: no traceback
        raise _fail(e) from None
    speed = result["env_steps_per_s"]
    typer.echo(f"{algo} in the {world}: {result['num_timesteps']} env steps"
               + (f", {speed:.1f} env steps/s while training" if speed else "") + f"; checkpoint {result['checkpoint']}")
    if result["eval_history"]:
        last, rnd = result["eval_history"][-1], result["random_baseline"]
        typer.echo(f"real-maze return: agent {last['mean']:.2f} +- {last['std']:.2f}"
                   + (f", random {rnd['mean']:.2f} +- {rnd['std']:.2f}" if rnd else ""))


@agent_app.command("eval")
def agent_eval(
    agent: str = typer.Argument(..., help="Agent run folder (its latest checkpoint) or checkpoint folder."),
    env: str = typer.Option(DEFAULT_ENV_ID, help="Real Memory Maze id."),
    env_alias: str | None = typer.Option(None, "--env-id", hidden=True, help="Same as --env (the spelling `worldsim collect` uses)."),
    episodes: int = typer.Option(5, help="Episodes, played by the agent and by a random policy."),
    max_steps: int = typer.Option(1_000, help="Steps per episode."),
    seed: int = typer.Option(0, help="Episode i plays maze seed seed + i."),
    deterministic: bool = typer.Option(False, help="Take the policy's argmax action instead of sampling."),
    device: str = typer.Option("auto", help="auto (cuda when available), cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Play an agent in the real maze against a uniformly random policy on the same mazes."""
    from worldsim.agents.imagination import compare_with_random, format_comparison, load_agent
    from worldsim.commands.common import merge_alias, resolve_device

    env = merge_alias(env, env_alias, DEFAULT_ENV_ID, "--env", "--env-id")
    try:
        result = compare_with_random(load_agent(agent, device=resolve_device(device)), env, episodes, max_steps, seed,
                                     deterministic)
    except ValueError as e:
        raise _fail(e) from None
    typer.echo(json.dumps(result, indent=2) if as_json else format_comparison(result))
