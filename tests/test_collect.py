"""`worldsim collect`: datasets Minari opens, resuming, kills, bad input, failing workers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import minari

import numpy as np
import pytest

from worldsim.collect import (
    POLICY_CHOICES,
    CollectConfig,
    CollectionError,
    collect,
    run_episode,
    stack_infos,
)
from worldsim.data.minari_writer import dataset_dir

MAZE_ID = "worldsim/MemoryMaze-9x9-v0"
CRAFTER_ID = "worldsim/Crafter-v0"
MAZE_INFO_SHAPES = {
    "agent_pos": (2,), "agent_dir": (2,), "target_color": (3,), "target_pos": (2,),
    "targets_pos": (3, 2), "target_index": (),
}  # fmt: skip


def load(dataset_id: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> minari.MinariDataset:
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return minari.load_dataset(dataset_id)


def episode_metadata(dataset: minari.MinariDataset) -> list[dict]:
    return list(dataset.storage.get_episode_metadata(range(dataset.total_episodes)))


# ------------------------------------------------------------------ a real maze dataset
@pytest.fixture(scope="module")
def maze_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    config = CollectConfig(
        env_id=MAZE_ID, policy="mixed", episodes=3, workers=2, max_steps=40, seed=10,
        dataset_id="test/maze-mixed-v0", root=str(root), progress=False,
    )  # fmt: skip
    summary = collect(config)
    return config, summary, root


def test_collect_writes_a_minari_dataset_with_infos_and_metadata(maze_dataset, monkeypatch):
    config, summary, root = maze_dataset
    assert summary.episodes_written == summary.episodes_in_dataset == 3
    assert summary.steps_written == 120
    dataset = load(config.dataset_id, root, monkeypatch)
    assert (dataset.total_episodes, dataset.total_steps) == (3, 120)

    metas = episode_metadata(dataset)
    assert sorted(m["episode_index"] for m in metas) == [0, 1, 2]
    for episode, meta in zip(dataset.iterate_episodes(), metas):
        index = meta["episode_index"]
        assert meta["seed"] == meta["env_seed"] == meta["policy_seed"] == config.seed + index
        assert meta["policy"] in ("random", "navigator", "revisit") and meta["policy_params"]
        assert meta["num_steps"] == 40
        assert all(len(pair) == 2 and pair[0] - pair[1] >= 50 for pair in meta["revisits"])

        assert episode.observations.shape == (41, 64, 64, 3)
        assert episode.observations.dtype == np.uint8
        assert episode.actions.shape == (40,)
        assert not episode.terminations.any()
        # Cut by max_steps: only the last step is truncated.
        assert episode.truncations.tolist() == [False] * 39 + [True]
        assert {k: v.shape[1:] for k, v in episode.infos.items()} == MAZE_INFO_SHAPES
        assert all(len(v) == 41 for v in episode.infos.values())

        # The stored layout is the maze the agent moved in: it never stands in a wall.
        layout = np.array(meta["maze_layout"])
        assert layout.shape == (9, 9)
        cells = np.floor(episode.infos["agent_pos"]).astype(int)
        assert layout[cells[:, 1], cells[:, 0]].all()

    recorded = json.loads((root / config.dataset_id / "data" / "metadata.json").read_text())
    assert recorded["worldsim_collect"]["policy"] == "mixed"
    assert recorded["worldsim_collect"]["env_id"] == MAZE_ID


def test_an_episode_is_reproducible_from_its_recorded_seed(maze_dataset, monkeypatch):
    import worldsim.envs  # noqa: F401

    config, _, root = maze_dataset
    dataset = load(config.dataset_id, root, monkeypatch)
    meta = episode_metadata(dataset)[0]
    stored = dataset[0]
    env = gym.make(MAZE_ID)
    replay = run_episode(
        env, config.policy, episode_index=meta["episode_index"], seed=meta["env_seed"],
        max_steps=config.max_steps,
    )  # fmt: skip
    env.close()
    assert replay.metadata["policy"] == meta["policy"]
    np.testing.assert_array_equal(replay.actions, stored.actions)
    np.testing.assert_array_equal(replay.observations, stored.observations)


def test_rerun_skips_committed_episodes(maze_dataset):
    config, _, root = maze_dataset
    summary = collect(config)
    assert summary.episodes_written == 0
    assert summary.episodes_skipped == summary.episodes_in_dataset == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"policy": "random"}, "policy: dataset has 'mixed', this run asks for 'random'"),
        ({"max_steps": 50}, "max_steps: dataset has 40"),
        ({"seed": 0}, "seed: dataset has 10"),
        ({"env_id": "worldsim/MemoryMaze-11x11-v0"}, "env_id"),
    ],
)
def test_resuming_with_other_settings_is_refused(maze_dataset, change, message):
    config, _, _ = maze_dataset
    other = CollectConfig(**{**vars(config), **change})
    with pytest.raises(ValueError, match=message):
        collect(other)


# -------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"episodes": 0}, "episodes must be an integer >= 1"),
        ({"workers": 0}, "workers must be"),
        ({"max_steps": 0}, "max_steps must be None or an integer >= 1"),
        ({"seed": -1}, "seed must be"),
        ({"policy": "greedy"}, "policy must be one of"),
        ({"env_id": "worldsim/NoSuchEnv-v0"}, "unknown env id 'worldsim/NoSuchEnv-v0'"),
        ({"dataset_id": "not a valid id!"}, "invalid dataset id"),
    ],
)
def test_bad_config_is_refused_before_anything_is_written(tmp_path, change, message):
    settings = {"env_id": CRAFTER_ID, "policy": "random", "dataset_id": "test/bad-v0"}
    config = CollectConfig(**{**settings, "root": str(tmp_path), **change})
    with pytest.raises(ValueError, match=message):
        collect(config)
    assert list(tmp_path.iterdir()) == []


def test_maze_policy_in_crafter_is_refused_and_writes_nothing(tmp_path):
    config = CollectConfig(
        env_id=CRAFTER_ID, policy="navigator", episodes=1, workers=1, max_steps=5,
        dataset_id="test/crafter-nav-v0", root=str(tmp_path), progress=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="policy 'navigator' needs a Memory Maze env"):
        collect(config)
    assert not dataset_dir(config.dataset_id, tmp_path).exists()


def test_info_keys_must_not_change_during_an_episode():
    with pytest.raises(ValueError, match="info key 'b' is missing at step 1"):
        stack_infos([{"b": 1}, {"c": 2}])
    with pytest.raises(ValueError, match="info key 'a' changes shape"):
        stack_infos([{"a": np.zeros(2)}, {"a": np.zeros(3)}])
    with pytest.raises(ValueError, match=r"info keys \['c'\] appear at step 1"):
        stack_infos([{"a": 1}, {"a": 2, "c": 3}])


def test_cli_policy_choices_match_the_library():
    from typer.testing import CliRunner

    from worldsim.cli import app

    result = CliRunner().invoke(app, ["collect", "-p", "bogus"], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    offered = re.search(r"'bogus' is not one of (.*)\.", " ".join(result.output.replace("│", "").split()))
    assert offered is not None and tuple(re.findall(r"'(\w+)'", offered[1])) == POLICY_CHOICES, result.output


# ---------------------------------------------------------------- a worker that fails
class FaultyEnv(gym.Env):
    """Tiny env that fails on purpose, to exercise collect's handling of broken simulators:
    seed 11 raises inside `step`, seed 12 kills its process outright."""

    observation_space = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode_seed, self.t = seed, 0
        return np.zeros((8, 8, 3), np.uint8), {}

    def step(self, action):
        self.t += 1
        if self.t == 5 and self.episode_seed == 11:
            raise RuntimeError("simulator exploded")
        if self.t == 5 and self.episode_seed == 12:
            os._exit(7)
        return np.full((8, 8, 3), self.t, np.uint8), 0.0, False, self.t >= 10, {}


# Workers are spawned fresh: they find this registration by importing this module ("module:id").
if "worldsim_test/Faulty-v0" not in gym.registry:
    gym.register("worldsim_test/Faulty-v0", entry_point=f"{__name__}:FaultyEnv")
FAULTY_ID = f"{__name__}:worldsim_test/Faulty-v0"


def test_an_env_error_stops_the_run_naming_the_episode(tmp_path, monkeypatch):
    config = CollectConfig(
        env_id=FAULTY_ID, policy="random", episodes=3, workers=1, seed=10,
        dataset_id="test/faulty-v0", root=str(tmp_path), progress=False,
    )  # fmt: skip
    with pytest.raises(CollectionError, match=r"episode 1 \(seed 11\)[\s\S]*simulator exploded"):
        collect(config)
    dataset = load(config.dataset_id, tmp_path, monkeypatch)
    assert [m["episode_index"] for m in episode_metadata(dataset)] == [0]


def test_a_worker_that_dies_is_reported(tmp_path):
    config = CollectConfig(
        env_id=FAULTY_ID, policy="random", episodes=1, workers=1, seed=12,
        dataset_id="test/dies-v0", root=str(tmp_path), progress=False,
    )  # fmt: skip
    died = r"worker 0 died with exit code 7 while running episode 0 \(seed 12\)"
    with pytest.raises(CollectionError, match=died):
        collect(config)
    assert not dataset_dir(config.dataset_id, tmp_path).exists()


# ------------------------------------------------------ interrupt, SIGKILL, resume (CLI)
def committed_episodes(path: Path) -> int:
    try:
        return json.loads((path / "data" / "metadata.json").read_text())["total_episodes"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def start_cli(root: Path, episodes: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "worldsim.cli", "collect", "--env-id", CRAFTER_ID,
        "--policy", "random", "--episodes", str(episodes), "--workers", "2",
        "--max-steps", "150", "--seed", "0", "--dataset-id", "test/killed-v0",
        "--root", str(root), "--no-progress",
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_episodes(process: subprocess.Popen, path: Path, at_least: int) -> None:
    deadline = time.monotonic() + 60
    while committed_episodes(path) < at_least:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no episode committed within 60 s"
        time.sleep(0.02)


def test_interrupt_and_sigkill_keep_the_dataset_readable_and_rerun_completes(tmp_path, monkeypatch):
    episodes = 10
    path = tmp_path / "test" / "killed-v0"

    # Ctrl-C: the run stops cleanly after its current commit.
    process = start_cli(tmp_path, episodes)
    wait_for_episodes(process, path, 1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "re-run the same command to continue" in err
    after_interrupt = load("test/killed-v0", tmp_path, monkeypatch).total_episodes
    assert 1 <= after_interrupt < episodes

    # SIGKILL: no chance to clean up; the dataset must still open.
    process = start_cli(tmp_path, episodes)
    wait_for_episodes(process, path, after_interrupt + 1)
    process.kill()
    process.wait(timeout=10)
    after_kill = load("test/killed-v0", tmp_path, monkeypatch).total_episodes
    assert after_interrupt < after_kill

    # Re-running continues where the killed run stopped; every episode appears exactly once.
    process = start_cli(tmp_path, episodes)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert f"{episodes - after_kill} episodes written" in out
    assert "minari.load_dataset('test/killed-v0')" in out
    dataset = load("test/killed-v0", tmp_path, monkeypatch)
    metas = episode_metadata(dataset)
    assert [m["episode_index"] for m in metas] == list(range(episodes))  # id i is seed i, across kills too
    assert all(m["seed"] == m["episode_index"] for m in metas)
    assert dataset.total_steps == sum(m["num_steps"] for m in metas)
    assert not (path / ".staging").exists()


# -------------------------------------------------- episode ids follow seeds, whatever the workers do
class SlowFirstEnv(gym.Env):
    """Episodes of 6 steps whose frames hold their seed; seed 100 is slow, so with two workers the
    other episodes finish before it."""

    observation_space = gym.spaces.Box(0, 255, (4, 4, 3), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode_seed, self.t = seed, 0
        return np.full((4, 4, 3), seed % 256, np.uint8), {}

    def step(self, action):
        self.t += 1
        if self.episode_seed == 100:
            time.sleep(0.2)
        return np.full((4, 4, 3), self.episode_seed % 256, np.uint8), 0.0, False, self.t >= 6, {}


if "worldsim_test/SlowFirst-v0" not in gym.registry:
    gym.register("worldsim_test/SlowFirst-v0", entry_point=f"{__name__}:SlowFirstEnv")
SLOW_FIRST_ID = f"{__name__}:worldsim_test/SlowFirst-v0"


def test_episode_ids_map_to_seeds_whatever_order_workers_finish(tmp_path, monkeypatch):
    config = CollectConfig(
        env_id=SLOW_FIRST_ID, policy="random", episodes=4, workers=2, seed=100,
        dataset_id="test/ordered-v0", root=str(tmp_path), progress=False,
    )  # fmt: skip
    summary = collect(config)
    assert summary.episodes_written == 4
    dataset = load(config.dataset_id, tmp_path, monkeypatch)
    metas = episode_metadata(dataset)
    assert [m["episode_index"] for m in metas] == [0, 1, 2, 3]
    assert [m["seed"] for m in metas] == [100, 101, 102, 103]
    for i, episode in enumerate(dataset.iterate_episodes()):
        assert (episode.observations == 100 + i).all()  # the frames are those of seed 100 + i
    recorded = json.loads((tmp_path / config.dataset_id / "data" / "metadata.json").read_text())
    import worldsim

    assert recorded["requirements"][0] == f"worldsim=={worldsim.__version__}"
    assert {r.split("==")[0] for r in recorded["requirements"]} == {"worldsim", "gymnasium", "minari"}
    assert "WORLDSIM_CODE_PERMALINK" in recorded["code_permalink"]  # the placeholder says how to set it
