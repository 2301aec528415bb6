"""Planners in imagination and the MPC loop, on a real tiny world model + codec (random init, with
edited weights where a test needs the reward to depend on the action)."""

import json

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from worldsim.agents.mpc import run_mpc
from worldsim.agents.planners import CEM, MPPI, PlannerConfig, RandomShooting, make_planner, plan_memory_bytes
from worldsim.codec.checkpoint import save_codec
from worldsim.commands.plan import plan as plan_command
from worldsim.rollout.session import RolloutSession
from worldsim.train.checkpoint import save_checkpoint
from worldsim.train.ema import EMA
from tiny_world import tiny_parts

GOOD = 3  # the action the edited model rewards
app = typer.Typer()
app.command()(plan_command)


def _tiny(seed: int = 0):
    return tiny_parts(seed)


def _session(model, codec, seed=0):
    rng = np.random.default_rng(seed)
    s = RolloutSession(model, codec, batch=1, sampler_steps=1, seed=seed)
    s.reset(rng.integers(0, 256, (1, 3, 64, 64, 3), dtype=np.uint8), rng.integers(0, 6, (1, 2)))
    return s


def _one_step_rewards(session):
    """Predicted reward of each of the 6 actions, one step from the live stream."""
    return session.fork(6).step(np.arange(6)).rewards.numpy()


@pytest.fixture(scope="module")
def rewarding():
    """A model whose predicted reward is clearly highest for action GOOD: its action embedding is
    made large (so its features stand apart), and the reward output flipped if that made it lowest."""
    torch.set_num_threads(1)
    model, codec = _tiny()
    with torch.no_grad():
        table = model.net.action_emb.table.weight
        table[GOOD] = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(1)) * 3.0
        r = _one_step_rewards(_session(model, codec))
        if r.argmax() != GOOD:
            out = model.net.heads.mlp[2]
            out.weight[0].neg_()
            out.bias[0].neg_()
    r = _one_step_rewards(_session(model, codec))
    others = np.delete(r, GOOD)
    assert r.argmax() == GOOD and r[GOOD] - others.max() > 0.1 * (others.max() - others.min() + 1e-3), r
    return model, codec


@pytest.mark.parametrize("model_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cls", [RandomShooting, CEM, MPPI])
def test_planners_pick_the_rewarded_action(rewarding, cls, model_dtype):
    model, codec = rewarding
    planner = cls(PlannerConfig(horizon=2, candidates=24, iterations=3, elites=4, temperature=0.05,
                                model_dtype=model_dtype))
    plan = planner.plan(_session(model, codec), np.random.default_rng(0))
    assert plan.first_action == GOOD
    assert plan.actions.shape == (2,) and plan.actions.dtype == np.int64


def test_cem_distribution_concentrates(rewarding):
    model, codec = rewarding
    plan = CEM(PlannerConfig(horizon=2, candidates=24, iterations=4, elites=4)).plan(
        _session(model, codec), np.random.default_rng(1))
    assert np.allclose(plan.probs.sum(1), 1.0)
    assert plan.probs[0, GOOD] > 0.8  # from 1/6 at the start
    assert plan.scores[-1] >= plan.scores[0] - 1e-6


def test_planning_leaves_the_live_session_untouched(rewarding):
    model, codec = rewarding
    live = _session(model, codec, seed=4)
    twin = live.select([0])  # a copy taken before planning
    before = (live.frames_seen, live.latents.clone(), live.generators[0].get_state().clone())
    MPPI(PlannerConfig(horizon=3, candidates=8, iterations=2)).plan(live, np.random.default_rng(0))
    assert live.frames_seen == before[0] and live.batch == 1
    assert torch.equal(live.latents, before[1]) and torch.equal(live.generators[0].get_state(), before[2])
    a, b = live.step(np.array([2])), twin.step(np.array([2]))  # the same state dreams the same future
    assert torch.equal(a.frames, b.frames) and torch.equal(a.rewards, b.rewards)


def test_goal_image_pulls_towards_the_goal():
    """With only the goal term (rewards zeroed), the plan's last dreamed latent is at least as close
    to the goal as that of a random sequence."""
    torch.set_num_threads(1)
    model, codec = _tiny(2)
    with torch.no_grad():
        model.net.heads.mlp[2].weight.zero_()
        model.net.heads.mlp[2].bias.zero_()
    session = _session(model, codec)
    goal = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    planner = RandomShooting(PlannerConfig(horizon=2, candidates=16))
    planner.set_goal(codec, goal)
    plan = planner.plan(session, np.random.default_rng(0))
    scores = planner.score(session, np.random.default_rng(9).integers(0, 6, (16, 2)))
    assert plan.score < 0 and plan.score >= scores.max() - 1e-6
    with pytest.raises(ValueError, match="goal image"):
        planner.set_goal(codec, goal.astype(np.float32))


def test_settings_that_cannot_work_raise_clear_errors():
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match="horizon must be an integer >= 1"):
        CEM(PlannerConfig(horizon=0))
    with pytest.raises(ValueError, match="model_dtype must be one of"):
        CEM(PlannerConfig(model_dtype="float16"))
    with pytest.raises(ValueError, match="elites"):
        CEM(PlannerConfig(candidates=4, elites=8))
    with pytest.raises(ValueError, match="unknown planner 'beam'"):
        make_planner("beam")
    model, codec = _tiny()
    session = _session(model, codec)
    need = plan_memory_bytes(session, 1000)
    planner = RandomShooting(PlannerConfig(horizon=1, candidates=1000, max_memory_mb=need / 2**20 / 2))
    with pytest.raises(MemoryError, match=r"1000 candidates need about .* use at most \d+ candidates"):
        planner.plan(session, np.random.default_rng(0))
    with pytest.raises(ValueError, match="batch-1"):
        RandomShooting(PlannerConfig(horizon=1, candidates=2)).plan(session.fork(2), np.random.default_rng(0))


def test_mpc_loop_in_the_real_maze_returns_metrics():
    from worldsim.envs.memory_maze import MemoryMazeEnv

    torch.set_num_threads(1)
    model, codec = _tiny()
    env = MemoryMazeEnv(size=9)
    try:
        planner = CEM(PlannerConfig(horizon=2, candidates=4, iterations=2, elites=2))
        out = run_mpc(env, model, codec, planner, episodes=1, steps=3, context_frames=2, seed=0)
        base = run_mpc(env, model, codec, None, episodes=1, steps=3, context_frames=2, seed=0)
        with pytest.raises(ValueError, match="steps must be >= 1"):
            run_mpc(env, model, codec, planner, steps=0)
    finally:
        env.close()
    assert out["decisions"] == 3 and out["lengths"] == [3] and len(out["returns"]) == 1
    assert out["ms_per_decision"] > base["ms_per_decision"] > 0  # planning costs dreaming, random does not
    assert np.isfinite(out["returns"]).all() and np.isfinite(base["returns"]).all()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A world-model run folder whose sidecar records a tiny codec, as `worldsim train` writes it."""
    model, codec = _tiny()
    root = tmp_path_factory.mktemp("plan")
    codec_dir = save_codec(codec, root / "codec")
    save_checkpoint(root / "run", step=1, model=model, model_config=model.cfg.to_dict(),
                    optimizer=torch.optim.AdamW(model.parameters()), ema=EMA(model),
                    extra={"codec": {"path": str(codec_dir), "config": codec.config.to_dict()}, "sigma_data": 1.0})
    return root / "run"


def test_cli_prints_return_vs_random_as_json(checkpoint):
    torch.set_num_threads(1)
    result = CliRunner().invoke(app, ["--checkpoint", str(checkpoint), "--planner", "random-shooting",
                                      "--horizon", "1", "--candidates", "3", "--steps", "2",
                                      "--context-frames", "2", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["planner"]["decisions"] == 2 and data["random"]["decisions"] == 2
    assert data["settings"]["planner"] == "random-shooting"


def test_cli_bad_settings_exit_with_a_message():
    result = CliRunner().invoke(app, ["--horizon", "0"])
    assert result.exit_code == 2 and "horizon must be an integer >= 1" in result.output
    result = CliRunner().invoke(app, ["--planner", "beam"])
    assert result.exit_code == 2 and "random-shooting, cem, mppi" in result.output
    result = CliRunner().invoke(app, ["--planner", "cem", "--candidates", "4", "--elites", "5"])
    assert result.exit_code == 2 and "elites (5) cannot exceed candidates (4)" in result.output
    result = CliRunner().invoke(app, [])  # no checkpoint and no bundled model
    assert result.exit_code == 2 and "checkpoint" in result.output


def test_planning_never_decodes_frames(rewarding):
    """Scores are computed from latents, rewards and terminations: planning (also towards a goal
    image, compared in latent space) must not spend time in the codec's decoder."""
    model, codec = rewarding
    session = _session(model, codec)
    planner = CEM(PlannerConfig(horizon=2, candidates=8, iterations=2, elites=2))
    planner.set_goal(codec, np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8))

    def no_decoding(*args, **kwargs):
        raise AssertionError("the planner decoded frames")

    codec.decode = no_decoding  # instance attribute: shadows the method for this test only
    try:
        plan = planner.plan(session, np.random.default_rng(0))
    finally:
        del codec.decode
    assert plan.actions.shape == (2,) and np.isfinite(plan.score)
