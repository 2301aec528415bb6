"""`worldsim agent train|eval`: SB3 agents trained in the dream (or the real maze), scored in the real maze."""

from __future__ import annotations

import json
from typing import Any

import typer

from worldsim.commands.options import config_defaults, config_options

agent_app = typer.Typer(help="Train agents in imagination and score them in the real Memory Maze.", no_args_is_help=True)
DEFAULT_ENV_ID = config_defaults("worldsim.agents.imagination", "AgentTrainConfig")["env_id"]


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
@config_options("worldsim.agents.imagination", "AgentTrainConfig", skip=("policy_kwargs",))
def agent_train(
    # Taken here, not derived: the flag is --env (with --env-id hidden), the config's dict comes
    # from repeated KEY=VALUE pairs, and the command shows a progress bar unless told not to.
    env_id: str = typer.Option(DEFAULT_ENV_ID, "--env", help="The real maze: trained in (--world real) and evaluated in."),
    env_alias: str | None = typer.Option(None, "--env-id", hidden=True, help="Same as --env (the spelling `worldsim collect` uses)."),
    hyperparameters: list[str] = typer.Option([], "--hparam", help="Algorithm hyper-parameter KEY=VALUE (repeat), e.g. n_steps=64."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    resume: bool = typer.Option(False, help="Continue the run's latest checkpoint."),
    **fields: Any,
) -> None:
    """Train an SB3 agent in the dream (or the real maze), evaluating it in the real maze as it learns."""
    from worldsim.agents.imagination import AgentTrainConfig, train_agent
    from worldsim.commands.common import merge_alias

    env_id = merge_alias(env_id, env_alias, DEFAULT_ENV_ID, "--env", "--env-id")
    try:
        cfg = AgentTrainConfig(env_id=env_id, hyperparameters=_hyperparameters(hyperparameters), progress=progress,
                               **fields)
        result = train_agent(cfg, resume=resume)
    except ValueError as e:  # bad settings, unknown names, mismatched checkpoints: no traceback
        raise _fail(e) from None
    speed = result["env_steps_per_s"]
    typer.echo(f"{cfg.algo} in the {cfg.world}: {result['num_timesteps']} env steps"
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
