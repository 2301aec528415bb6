"""Agents trained in the dream of a real tiny world model and in the real Memory Maze, scored in
the real maze; checkpoints without pickles, resume, the CLI and the example script.

Real maze resets cost ~1.5 s each on this machine, so tests that only need *some* context frames
for the dream use random ones (`fake_pool`); one test walks the real maze for them.
"""

import json
import runpy
import shutil
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from tiny_world import save_run, tiny_parts
from worldsim.agents import imagination
from worldsim.agents.agent_checkpoint import read_agent_meta
from worldsim.agents.imagination import (
    AgentTrainConfig, RealMazeEvaluator, compare_with_random, evaluate_agent, evaluate_random, load_agent,
    train_agent,
)
from worldsim.cli import app
from worldsim.codec.checkpoint import save_codec
from worldsim.envs.dream import ClipContext

pytestmark = pytest.mark.usefixtures("one_thread")
MAZE = "worldsim/MemoryMaze-9x9-v0"
REPO = Path(__file__).resolve().parents[1]
# Small everything: 2 streams, 16-step episodes, 1 denoiser call, PPO rollouts of 2 x 32 steps.
FAST = dict(num_envs=2, horizon=16, sampler_steps=1, context_mazes=1, context_walk=12, eval_max_steps=6,
            device="cpu", hyperparameters={"n_steps": 32, "n_epochs": 1})


def save_world(root: Path, **overrides) -> str:
    """A tiny world-model run that never predicts termination, so dream episodes end at the horizon."""
    model, codec = tiny_parts(0, **overrides)
    with torch.no_grad():
        model.net.heads.mlp[-1].bias[1] = -100.0
    return str(save_run(root / "run", model, save_codec(codec, root / "codec"), codec))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return save_world(tmp_path_factory.mktemp("world"))


@pytest.fixture
def fake_pool(monkeypatch):
    """Random frames as dream context instead of walking the real maze."""
    def pool(env, mazes, walk, seed=0):
        rng = np.random.default_rng(seed)
        return ClipContext([rng.integers(0, 256, (walk + 1, 64, 64, 3), dtype=np.uint8)], [rng.integers(0, 6, walk)])

    monkeypatch.setattr(imagination, "collect_context_pool", pool)


@pytest.fixture(scope="module")
def dream_run(world, tmp_path_factory):
    """PPO for 128 steps in the dream (contexts from a real random walk), scored in the real maze every 64."""
    cfg = AgentTrainConfig(run_dir=str(tmp_path_factory.mktemp("agents") / "ppo"), checkpoint=world, steps=128,
                           eval_every=64, eval_episodes=1, **FAST)
    torch.set_num_threads(1)
    return cfg, train_agent(cfg)


def test_dream_training_writes_pickle_free_checkpoints(dream_run):
    cfg, result = dream_run
    run = Path(cfg.run_dir)
    assert result["num_timesteps"] == 128 and result["world"]["kind"] == "dream"
    assert result["world"]["sha256"] and result["env_steps_per_s"] > 0
    assert [e["num_timesteps"] for e in result["eval_history"]] == [64, 128]
    assert set(result["random_baseline"]) >= {"returns", "mean", "std"}

    files = [p.relative_to(run) for p in run.rglob("*") if p.is_file()]
    assert all(p.suffix in (".json", ".safetensors") or p.parts[0] == "tb" for p in files), files
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".zip", ".pt", ".pth")]
    for step in ("step_000064", "step_000128"):
        names = sorted(p.name for p in (run / "checkpoints" / step).iterdir())
        assert names == ["agent.json", "optimizer.safetensors", "policy.safetensors"]
    assert json.loads((run / "latest.json").read_text())["checkpoint"] == "checkpoints/step_000128"

    meta = read_agent_meta(run)
    assert meta["algorithm"] == "ppo" and meta["policy"] == "CnnPolicy" and meta["num_timesteps"] == 128
    assert meta["observation_space"] == {"type": "Box", "shape": [64, 64, 3], "dtype": "uint8", "low": 0, "high": 255}
    assert meta["action_space"]["n"] == 6 and meta["world"]["checkpoint"]
    agent = load_agent(run)
    with safe_open(run / "checkpoints/step_000128/policy.safetensors", framework="pt") as f:
        for key, value in agent.policy.state_dict().items():
            assert torch.equal(f.get_tensor(key), value), key
    assert 0 <= int(agent.predict(np.zeros((64, 64, 3), np.uint8))) < 6

    events = b"".join(p.read_bytes() for p in (run / "tb").rglob("events.out.tfevents.*"))
    assert b"eval/mean_return" in events and b"eval/random_mean_return" in events


def test_resume_continues_from_the_latest_checkpoint(dream_run, tmp_path, fake_pool):
    cfg, _ = dream_run
    run = tmp_path / "ppo"
    shutil.copytree(cfg.run_dir, run)
    with pytest.raises(ValueError, match="already holds an agent.*resume"):
        train_agent(replace(cfg, run_dir=str(run), steps=192))
    with pytest.raises(ValueError, match="cannot resume it as a2c"):
        train_agent(replace(cfg, run_dir=str(run), algo="a2c"), resume=True)

    before = load_agent(run).policy.state_dict()
    # Learning rate 0: the resumed weights must be exactly the saved ones, not a fresh init.
    resumed = replace(cfg, run_dir=str(run), steps=192, eval_episodes=0,
                      hyperparameters={**cfg.hyperparameters, "learning_rate": 0.0})
    result = train_agent(resumed, resume=True)
    assert result["num_timesteps"] == 192 and result["trained_steps"] == 64
    meta = read_agent_meta(run)
    assert meta["num_timesteps"] == 192
    assert [s["from_timesteps"] for s in meta["sessions"]] == [0, 128]
    assert [e["num_timesteps"] for e in meta["eval_history"]] == [64, 128]  # kept across the resume
    after = load_agent(run).policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert train_agent(resumed, resume=True)["trained_steps"] == 0  # already there: nothing to do


def test_real_maze_training(tmp_path):
    cfg = AgentTrainConfig(run_dir=str(tmp_path / "real"), world="real", steps=64, eval_episodes=0,
                           **{**FAST, "num_envs": 1, "hyperparameters": {"n_steps": 64, "n_epochs": 1}})
    result = train_agent(cfg)
    assert result["num_timesteps"] == 64 and result["world"] == {"kind": "real", "env_id": MAZE, "horizon": 16}
    assert result["env_steps_per_s"] > 0 and result["eval_history"] == []
    meta = read_agent_meta(tmp_path / "real")
    assert meta["sessions"] == [{"world": "real", "from_timesteps": 0, "to_timesteps": 64}]


@pytest.mark.parametrize("algo, hyperparameters", [
    ("a2c", {"n_steps": 8}),
    ("dqn", {"learning_starts": 16, "train_freq": 4, "target_update_interval": 16}),
])
def test_a2c_and_dqn_train_through_the_same_path(world, tmp_path, fake_pool, algo, hyperparameters):
    cfg = AgentTrainConfig(run_dir=str(tmp_path / algo), checkpoint=world, algo=algo, steps=64, eval_episodes=0,
                           **{**FAST, "hyperparameters": hyperparameters})
    assert train_agent(cfg)["num_timesteps"] >= 64
    agent = load_agent(tmp_path / algo)
    assert agent.meta["algorithm"] == algo and agent.meta["hyperparameters"]["buffer_size" if algo == "dqn" else "n_steps"]
    assert 0 <= int(agent.predict(np.zeros((64, 64, 3), np.uint8))) < 6


class RecordFrames(gym.Wrapper):
    def __init__(self, env):
        super().__init__(env)
        self.frames = []

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.frames.append(obs)
        return obs, info

    def step(self, action):
        out = self.env.step(action)
        self.frames.append(out[0])
        return out


def test_evaluation_on_fixed_seeds(dream_run):
    maze = RecordFrames(gym.make(MAZE, disable_env_checker=True))
    try:
        evaluator = RealMazeEvaluator(MAZE, episodes=2, max_steps=5, seed=3, maze=maze)
        first = evaluator.random()
        frames, maze.frames = maze.frames, []
        again = evaluator.random()
        assert set(first) == {"returns", "lengths", "mean", "std"} and first["lengths"] == [5, 5]
        assert first == again and len(frames) == 12
        assert all(np.array_equal(a, b) for a, b in zip(frames, maze.frames))  # same seeds, same mazes and actions
        assert not np.array_equal(frames[0], frames[6])  # episode 1 plays another maze

        # The agent's sampled actions are seeded per episode as well.
        once = RealMazeEvaluator(MAZE, episodes=1, max_steps=5, seed=3, maze=maze)
        agent = load_agent(dream_run[0].run_dir)
        runs = []
        for _ in range(2):
            maze.frames = []
            once.policy(agent.policy)
            runs.append(np.stack(maze.frames))
        assert np.array_equal(runs[0], runs[1])
    finally:
        maze.close()


def four_action_dataset(root: Path) -> str:
    """A Minari dataset of random frames and Discrete(4) actions: dream contexts for a 4-action model."""
    from worldsim.data.minari_writer import DatasetWriter, Episode

    rng = np.random.default_rng(0)
    writer = DatasetWriter("agents/four-actions-v0", gym.spaces.Box(0, 255, (64, 64, 3), np.uint8),
                           gym.spaces.Discrete(4), root=root)
    no = np.zeros(19, bool)
    writer.append(Episode(rng.integers(0, 256, (20, 64, 64, 3), dtype=np.uint8), rng.integers(0, 4, 19),
                          np.zeros(19), no, no))
    return str(writer.path)


def test_mismatched_spaces_are_named(tmp_path):
    four_actions = save_world(tmp_path, n_actions=4)
    cfg = AgentTrainConfig(run_dir=str(tmp_path / "a"), checkpoint=four_actions, steps=64, **FAST)
    # Refused before anything is built: the maze's walks cannot be its context, the maze cannot score it.
    with pytest.raises(ValueError, match=r"Discrete\(4\).*Discrete\(6\).*context clips"):
        train_agent(cfg)
    cfg = replace(cfg, dataset=four_action_dataset(tmp_path / "data"))
    with pytest.raises(ValueError, match=r"Discrete\(4\).*Discrete\(6\).*eval-episodes 0"):
        train_agent(cfg)
    assert train_agent(replace(cfg, eval_episodes=0))["world"]["context"] == cfg.dataset
    with pytest.raises(ValueError, match=r"trained on .*Discrete\(4\).*the env has .*Discrete\(6\)"):
        evaluate_agent(tmp_path / "a", episodes=1, max_steps=2)
    with pytest.raises(ValueError, match=r"Discrete\(4\).*Discrete\(6\)"):
        compare_with_random(load_agent(tmp_path / "a"), episodes=1, max_steps=2)


def test_unknown_names_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown algorithm 'sac'.*\['a2c', 'dqn', 'ppo'\]"):
        AgentTrainConfig(run_dir=str(tmp_path), algo="sac").check()
    with pytest.raises(ValueError, match=r"unknown env 'worldsim/Maze-v9'.*MemoryMaze-9x9-v0"):
        AgentTrainConfig(run_dir=str(tmp_path), env_id="worldsim/Maze-v9").check()
    with pytest.raises(ValueError, match=r"unknown env 12"):
        evaluate_random(12, episodes=1, max_steps=1)
    with pytest.raises(ValueError, match=r"unknown world 'mars'"):
        AgentTrainConfig(run_dir=str(tmp_path), world="mars").check()
    with pytest.raises(ValueError, match=r"unknown policy 'CNN'.*CnnPolicy"):
        AgentTrainConfig(run_dir=str(tmp_path), policy="CNN").check()
    with pytest.raises(ValueError, match="JSON-able"):
        AgentTrainConfig(run_dir=str(tmp_path), policy_kwargs={"activation_fn": torch.nn.Tanh}).check()
    with pytest.raises(ValueError, match="neither an agent checkpoint"):
        load_agent(tmp_path)


def test_cli_train_and_eval(world, tmp_path, fake_pool):
    runner = CliRunner()
    run = tmp_path / "cli"
    args = ["agent", "train", "--run-dir", str(run), "--checkpoint", world, "--steps", "64", "--num-envs", "2",
            "--horizon", "16", "--sampler-steps", "1", "--eval-episodes", "0", "--hparam", "n_steps=32",
            "--hparam", "n_epochs=1", "--device", "cpu", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "64 env steps" in result.output and read_agent_meta(run)["hyperparameters"]["n_steps"] == 32

    result = runner.invoke(app, ["agent", "eval", str(run), "--episodes", "1", "--max-steps", "3", "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert set(scores) == {"agent", "random", "settings"} and scores["settings"]["trained_in"] == "dream"
    assert scores["agent"]["lengths"] == [3]

    for bad, message in ((["--algo", "sac"], "unknown algorithm"), (["--world", "mars"], "unknown world"),
                         (["--hparam", "n_steps"], "KEY=VALUE"), (["--hparam", "n_stepz=3"], "n_stepz")):
        result = runner.invoke(app, [*args[:3], str(tmp_path / "x"), *args[4:], *bad])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(app, ["agent", "eval", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "error:" in result.output


def test_example_script_runs(world, tmp_path, fake_pool, capsys):
    example = runpy.run_path(str(REPO / "examples" / "train_ppo_in_dream.py"))
    scores = example["main"](["--checkpoint", world, "--steps", "64", "--num-envs", "1", "--horizon", "16",
                              "--episodes", "1", "--max-steps", "3", "--run-dir", str(tmp_path / "ex")])
    assert scores["agent"]["lengths"] == [3]
    out = capsys.readouterr().out
    assert "trained" in out and "random" in out and "agent" in out
