"""DatasetWriter: episodes round-trip through minari.load_dataset; crashes leave no trace."""

import gymnasium as gym
import minari
import numpy as np
import pytest

from worldsim.data.minari_writer import DatasetWriter, Episode

OBS = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)
ACT = gym.spaces.Discrete(6)


def make_episode(steps: int, seed: int) -> Episode:
    rng = np.random.default_rng(seed)
    return Episode(
        observations=rng.integers(0, 256, (steps + 1, 8, 8, 3), dtype=np.uint8),
        actions=rng.integers(0, 6, steps),
        rewards=rng.random(steps),
        terminations=np.zeros(steps, bool),
        truncations=np.arange(steps) == steps - 1,
        infos={"pos": rng.random((steps + 1, 2)), "index": np.arange(steps + 1)},
        seed=seed,
        metadata={"policy": "test", "revisits": [[5, 1]]},
    )


def test_round_trip_through_minari(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    writer = DatasetWriter("worldsim/writer-test-v0", OBS, ACT)
    episodes = [make_episode(n, seed) for seed, n in enumerate((5, 9))]
    for ep in episodes:
        writer.append(ep)
    dataset = minari.load_dataset("worldsim/writer-test-v0")
    assert (dataset.total_episodes, dataset.total_steps) == (2, 14)
    for ep, stored in zip(episodes, dataset.iterate_episodes()):
        np.testing.assert_array_equal(stored.observations, ep.observations)
        np.testing.assert_array_equal(stored.actions, ep.actions)
        np.testing.assert_array_equal(stored.rewards, ep.rewards)
        np.testing.assert_array_equal(stored.truncations, ep.truncations)
        np.testing.assert_array_equal(stored.infos["pos"], ep.infos["pos"])
        # Per-step scalars need the writer's workaround for Minari's arrow storage.
        np.testing.assert_array_equal(stored.infos["index"], ep.infos["index"])
    assert writer.episode_metadata()[1]["revisits"] == [[5, 1]]
    assert writer.episode_metadata()[1]["seed"] == 1


def test_reopen_discards_uncommitted_episode(tmp_path):
    writer = DatasetWriter("worldsim/crash-v0", OBS, ACT, root=tmp_path)
    writer.append(make_episode(4, 0))
    # A crash after the rename but before metadata.json is replaced leaves folder "1" behind.
    (writer.data_path / "1").mkdir()
    (writer.data_path / "1" / "part-0.arrow").write_bytes(b"half written")
    (writer.staging_path).mkdir()
    reopened = DatasetWriter("worldsim/crash-v0", OBS, ACT, root=tmp_path)
    assert reopened.total_episodes == 1
    assert not (writer.data_path / "1").exists() and not writer.staging_path.exists()
    assert reopened.append(make_episode(3, 1)) == 1
    assert minari.MinariDataset(writer.data_path).total_steps == 7


def test_reopen_with_another_space_is_refused(tmp_path):
    DatasetWriter("worldsim/spaces-v0", OBS, ACT, root=tmp_path).append(make_episode(2, 0))
    with pytest.raises(ValueError, match="different action space"):
        DatasetWriter("worldsim/spaces-v0", OBS, gym.spaces.Discrete(17), root=tmp_path)


def test_bad_ids_and_shapes(tmp_path):
    with pytest.raises(ValueError, match="invalid dataset id"):
        DatasetWriter("no version here!", OBS, ACT, root=tmp_path)
    with pytest.raises(ValueError, match="needs 6 observations, got 5"):
        Episode(np.zeros((5, 8, 8, 3), np.uint8), np.zeros(5), np.zeros(5), np.zeros(5), np.zeros(5))
