"""Model-predictive control in the real env, planning in the dream.

    result = run_mpc(env, model, codec, planner, episodes=1, steps=100, context_frames=9, seed=0)

Per episode: reset the real env, drive it for `context_frames - 1` uniformly random actions and
prefill a batch-1 `RolloutSession` with those REAL frames. Then, each decision:

    plan in imagination from the live session (the planner forks it; the session is not advanced)
    execute the plan's first action in the real env
    commit the REAL next frame to the session (`RolloutSession.observe`), so the model's state always
    holds the real past, never its own dreams

`planner=None` is the random baseline through the same loop (same context, same real frames fed
back, uniform actions), so the two returns differ only by how the actions were chosen. Returns
count the rewards of the `steps` controlled steps, not of the random context steps.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from worldsim.agents.planners import Planner
from worldsim.rollout.session import RolloutSession


def _check_args(env, model, episodes: int, steps: int, context_frames: int) -> None:
    for name, value in (("episodes", episodes), ("steps", steps), ("context_frames", context_frames)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if model.cfg.action_kind != "discrete":
        raise ValueError("run_mpc drives discrete-action models; this one takes continuous actions")
    n = getattr(env.action_space, "n", None)
    if n != model.cfg.n_actions:
        raise ValueError(f"the env has action space {env.action_space}, the model takes {model.cfg.n_actions} actions")


def _real_context(env, n_frames: int, seed: int, rng: np.random.Generator):
    """Reset the real env and take n_frames - 1 random actions -> frames (T0, H, W, 3), actions (T0 - 1,)."""
    obs, _ = env.reset(seed=seed)
    frames, actions = [obs], []
    for _ in range(n_frames - 1):
        a = int(rng.integers(env.action_space.n))
        obs, _, terminated, truncated, _ = env.step(a)
        frames.append(obs)
        actions.append(a)
        if terminated or truncated:
            raise ValueError(f"the real episode ended during the {n_frames}-frame context: lower context_frames")
    return np.stack(frames), np.asarray(actions, dtype=np.int64)


@torch.no_grad()
def run_mpc(env, model, codec, planner: Planner | None, episodes: int = 1, steps: int = 100,
            context_frames: int = 9, seed: int = 0) -> dict[str, Any]:
    """Run MPC (or the random baseline when `planner` is None); see the module doc.

    -> dict(returns: list per episode, decisions: total decisions taken,
            ms_per_decision: mean planning time per decision, lengths: steps per episode)."""
    _check_args(env, model, episodes, steps, context_frames)
    rng = np.random.default_rng(seed)
    # The live session only commits real frames; its own sampler runs once per step inside
    # observe, so give it the planner's (cheap) sampler setting.
    sampler_steps = planner.config.sampler_steps if planner is not None else 1
    n_actions = model.cfg.n_actions
    returns, lengths, plan_seconds = [], [], []
    for ep in range(episodes):
        # Context and sampler noise from their own per-episode stream: the planner and the random
        # baseline see the same real context in every episode, however many draws planning took.
        ep_rng = np.random.default_rng([seed, ep])
        frames, actions = _real_context(env, context_frames, seed + ep, ep_rng)
        session = RolloutSession(model, codec, batch=1, sampler_steps=sampler_steps)
        session.reset(frames[None], actions[None], seeds=[int(ep_rng.integers(2**63 - 1))])
        total, t = 0.0, 0
        for t in range(1, steps + 1):
            start = time.perf_counter()
            if planner is None:
                action = int(rng.integers(n_actions))
            else:
                action = planner.plan(session, rng).first_action
            if session.device.type == "cuda":
                torch.cuda.synchronize(session.device)
            plan_seconds.append(time.perf_counter() - start)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
            session.observe([action], frames=np.asarray(obs)[None])  # the real frame, not the dream
        returns.append(total)
        lengths.append(t)
    return {
        "returns": returns,
        "decisions": len(plan_seconds),
        "ms_per_decision": 1e3 * float(np.mean(plan_seconds)),
        "lengths": lengths,
    }


def compare_with_random(env, model, codec, planner: Planner, episodes: int = 1, steps: int = 100,
                        context_frames: int = 9, seed: int = 0) -> dict[str, Any]:
    """The planner and the random baseline on the same env seeds -> {"planner": ..., "random": ...}."""
    return {
        "planner": run_mpc(env, model, codec, planner, episodes, steps, context_frames, seed),
        "random": run_mpc(env, model, codec, None, episodes, steps, context_frames, seed),
    }
