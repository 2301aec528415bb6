"""The window loader yields exactly the source steps, from arrow and HDF5 Minari datasets."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from worldsim.data.bench_loader import measure_loader
from worldsim.data.episode_store import DatasetError, EpisodeStore
from worldsim.data.minari_writer import DatasetWriter, Episode
from worldsim.data.windows import WindowDataset, WindowSampler

T = 8
LENGTHS = [40, 7, 25, 33, 16]  # episode 1 is shorter than T: it has no window
DISCRETE = gym.spaces.Discrete(6)
BOX = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)


def image_space(shape=(16, 16, 3)) -> gym.spaces.Box:
    return gym.spaces.Box(0, 255, shape, np.uint8)


def make_episodes(
    seed: int, lengths, frame_shape, action_space, *, smooth=False, dict_obs=False
) -> list[dict]:
    """Random episodes; `smooth` frames are gradients, which survive JPEG almost unchanged."""
    rng = np.random.default_rng(seed)
    episodes = []
    for i, n in enumerate(lengths):
        if smooth:
            h, w, c = frame_shape
            ramp = np.add.outer(np.arange(h), np.arange(w))[None, :, :, None]  # (1, H, W, 1)
            offsets = rng.integers(0, 120, (n + 1, 1, 1, c))
            frames = (ramp * 2 + offsets).clip(0, 255).astype(np.uint8)  # (N+1, H, W, C)
        else:
            frames = rng.integers(0, 256, (n + 1, *frame_shape), dtype=np.uint8)
        if isinstance(action_space, gym.spaces.Discrete):
            actions = rng.integers(0, action_space.n, n)
        else:
            actions = rng.uniform(-1, 1, (n, *action_space.shape)).astype(np.float32)
        terminations = np.zeros(n, bool)
        truncations = np.zeros(n, bool)
        (terminations if i % 2 else truncations)[-1] = True
        if i == 0:
            terminations[n // 2] = True  # a flag inside a window must come through too
        obs = frames
        if dict_obs:
            obs = {"image": frames, "target_color": rng.random((n + 1, 3)).astype(np.float32)}
        episodes.append(
            dict(
                observations=obs,
                frames=frames,
                actions=actions,
                rewards=rng.normal(size=n),
                terminations=terminations,
                truncations=truncations,
            )
        )
    return episodes


def write_worldsim(root: Path, dataset_id: str, episodes, obs_space, action_space) -> Path:
    writer = DatasetWriter(dataset_id, obs_space, action_space, root=root)
    for ep in episodes:
        fields = ("observations", "actions", "rewards", "terminations", "truncations")
        writer.append(Episode(**{name: ep[name] for name in fields}))
    return writer.path


def write_random(
    root: Path, dataset_id: str, lengths, frame_shape=(16, 16, 3), action_space=DISCRETE
) -> Path:
    episodes = make_episodes(0, lengths, frame_shape, action_space)
    return write_worldsim(root, dataset_id, episodes, image_space(frame_shape), action_space)


def still_episode(observations) -> Episode:
    """An episode of zeros around the given observations (N + 1 of them)."""
    first = next(iter(observations.values())) if isinstance(observations, dict) else observations
    n = len(first) - 1
    no = np.zeros(n, bool)
    return Episode(observations, np.zeros(n, int), np.zeros(n), terminations=no, truncations=no)


def write_minari(dataset_id: str, episodes, obs_space, action_space, data_format, jpeg) -> None:
    """A dataset made by Minari itself, under MINARI_DATASETS_PATH."""
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = [
        EpisodeBuffer(
            id=i,
            observations=ep["observations"],
            actions=ep["actions"],
            rewards=ep["rewards"],
            terminations=ep["terminations"],
            truncations=ep["truncations"],
        )
        for i, ep in enumerate(episodes)
    ]
    minari.create_dataset_from_buffers(
        dataset_id,
        buffers,
        observation_space=obs_space,
        action_space=action_space,
        data_format=data_format,
        jpeg_encoding=jpeg,
    )


# Minari asks for author, permalink, env spec... on every dataset it creates; not our concern here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:minari.utils")


@pytest.fixture
def minari_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def expected_windows(lengths, window, stride=1) -> list[tuple[int, int]]:
    return [(e, s) for e, n in enumerate(lengths) for s in range(0, n - window + 1, stride)]


def assert_window_matches(item, episodes, *, exact_frames=True) -> None:
    ep = episodes[int(item["episode"])]
    s = int(item["start"])
    steps = slice(s, s + T)
    if exact_frames:
        np.testing.assert_array_equal(item["frames"].numpy(), ep["frames"][steps])
    np.testing.assert_array_equal(item["actions"].numpy(), ep["actions"][steps])
    np.testing.assert_array_equal(item["rewards"].numpy(), ep["rewards"][steps].astype(np.float32))
    np.testing.assert_array_equal(item["terminations"].numpy(), ep["terminations"][steps])
    np.testing.assert_array_equal(item["truncations"].numpy(), ep["truncations"][steps])


# ------------------------------------------------------------------------- correctness: arrow
@pytest.mark.parametrize("action_space", [DISCRETE, BOX], ids=["discrete", "box"])
def test_arrow_windows_equal_source_arrays(tmp_path, action_space):
    episodes = make_episodes(0, LENGTHS, (16, 16, 3), action_space)
    path = write_worldsim(tmp_path, "test/arrow-v0", episodes, image_space(), action_space)
    ds = WindowDataset(path, T)

    assert len(ds) == len(expected_windows(LENGTHS, T)) == 33 + 18 + 26 + 9
    seen = []
    for i in range(len(ds)):
        item = ds[i]
        assert item["frames"].dtype == torch.uint8 and item["frames"].shape == (T, 16, 16, 3)
        want_dtype = torch.int64 if action_space is DISCRETE else torch.float32
        assert item["actions"].dtype == want_dtype
        assert item["actions"].shape == (T, *action_space.shape)
        assert item["rewards"].dtype == torch.float32
        assert item["terminations"].dtype == item["truncations"].dtype == torch.bool
        assert int(item["source"]) == 0
        assert_window_matches(item, episodes)
        seen.append((int(item["episode"]), int(item["start"])))
    # Every window once, none crossing an episode end, the short episode 1 skipped.
    assert seen == expected_windows(LENGTHS, T)
    assert all(s + T <= LENGTHS[e] for e, s in seen) and 1 not in {e for e, _ in seen}
    assert ds[-1]["start"] == ds[len(ds) - 1]["start"]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_stride_keeps_starts_on_the_grid(tmp_path):
    episodes = make_episodes(1, LENGTHS, (16, 16, 3), DISCRETE)
    path = write_worldsim(tmp_path, "test/stride-v0", episodes, image_space(), DISCRETE)
    # Two open episodes at most: reading in random order keeps closing and reopening files.
    ds = WindowDataset(path, T, stride=3, max_open_episodes=2)
    got = [(int(ds[i]["episode"]), int(ds[i]["start"])) for i in range(len(ds))]
    assert got == expected_windows(LENGTHS, T, stride=3)
    for i in np.random.default_rng(0).permutation(len(ds)):
        assert_window_matches(ds[int(i)], episodes)


def test_dict_observations_and_image_key(tmp_path):
    episodes = make_episodes(2, [20, 12], (16, 16, 3), DISCRETE, dict_obs=True)
    obs_space = gym.spaces.Dict(
        {"image": image_space(), "target_color": gym.spaces.Box(0, 1, (3,), np.float32)}
    )
    path = write_worldsim(tmp_path, "test/dict-v0", episodes, obs_space, DISCRETE)
    for key in (None, "image"):
        ds = WindowDataset(path, T, image_key=key)
        assert len(ds) == 13 + 5
        for i in range(0, len(ds), 3):
            assert_window_matches(ds[i], episodes)
    with pytest.raises(DatasetError, match=r"image_key 'nope' is not in .*target_color"):
        WindowDataset(path, T, image_key="nope")
    with pytest.raises(DatasetError, match=r"'target_color' is Box.*not an image"):
        WindowDataset(path, T, image_key="target_color")


def test_dict_with_two_images_needs_image_key(tmp_path):
    rng = np.random.default_rng(3)
    n = 10
    views = {k: rng.integers(0, 256, (n + 1, 16, 16, 3), dtype=np.uint8) for k in ("left", "right")}
    space = gym.spaces.Dict({k: image_space() for k in views})
    writer = DatasetWriter("test/two-v0", space, DISCRETE, root=tmp_path)
    writer.append(still_episode(views))
    with pytest.raises(DatasetError, match=r"several image observations.*image_key"):
        WindowDataset(writer.path, T)
    item = WindowDataset(writer.path, T, image_key="right")[1]
    np.testing.assert_array_equal(item["frames"].numpy(), views["right"][1 : 1 + T])


def test_grayscale_frames_get_a_channel_axis(tmp_path):
    episodes = make_episodes(4, [12], (16, 16), DISCRETE)
    path = write_worldsim(tmp_path, "test/gray-v0", episodes, image_space((16, 16)), DISCRETE)
    item = WindowDataset(path, T)[2]
    assert item["frames"].shape == (T, 16, 16, 1)
    np.testing.assert_array_equal(item["frames"][..., 0].numpy(), episodes[0]["frames"][2 : 2 + T])


# ------------------------------------------------------------------ correctness: Minari-made
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize(
    "data_format, jpeg, dict_obs",
    [("hdf5", False, False), ("hdf5", True, False), ("hdf5", True, True), ("arrow", True, False)],
    ids=["hdf5-raw", "hdf5-jpeg", "hdf5-jpeg-dict", "arrow-jpeg"],
)
def test_minari_made_datasets(minari_root, data_format, jpeg, dict_obs):
    import minari

    lengths = [30, 5, 18]
    # 32x32: Minari JPEG-encodes only images of at least 32x32.
    episodes = make_episodes(5, lengths, (32, 32, 3), BOX, smooth=jpeg, dict_obs=dict_obs)
    obs_space = image_space((32, 32, 3))
    if dict_obs:
        obs_space = gym.spaces.Dict(
            {"image": obs_space, "target_color": gym.spaces.Box(0, 1, (3,), np.float32)}
        )
    dataset_id = f"test/made-{data_format}-{int(jpeg)}-{int(dict_obs)}-v0"
    write_minari(dataset_id, episodes, obs_space, BOX, data_format, jpeg)

    ds = WindowDataset(dataset_id, T)  # by id, resolved through MINARI_DATASETS_PATH
    assert ds.stores[0].frames_are_jpeg == jpeg
    assert len(ds) == len(expected_windows(lengths, T))
    # What Minari itself decodes: our frames must be bit-identical to it.
    minari_frames = []
    for episode in minari.load_dataset(dataset_id).iterate_episodes():
        obs = episode.observations
        minari_frames.append(obs["image"] if dict_obs else obs)
    for i in range(len(ds)):
        item = ds[i]
        e, s = int(item["episode"]), int(item["start"])
        assert_window_matches(item, episodes, exact_frames=not jpeg)
        np.testing.assert_array_equal(item["frames"].numpy(), minari_frames[e][s : s + T])
        if jpeg:
            assert psnr(item["frames"].numpy(), episodes[e]["frames"][s : s + T]) > 30


# --------------------------------------------------------------- determinism and processes
@pytest.fixture(scope="module")
def loader_dataset(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("loader")
    episodes = make_episodes(6, [60, 45, 3, 50], (16, 16, 3), DISCRETE)
    return write_worldsim(root, "test/loader-v0", episodes, image_space(), DISCRETE), episodes


def batches(ds, seed, workers, n=8):
    sampler = WindowSampler(ds, seed=seed, num_samples=n * 4)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers)
    return list(loader)


def test_same_seed_same_batches_with_0_and_2_workers(loader_dataset):
    path, episodes = loader_dataset
    ds = WindowDataset(path, T)
    ds[0]  # storage opened in the parent before workers fork: they must reopen their own
    in_process = batches(ds, seed=7, workers=0)
    in_workers = batches(ds, seed=7, workers=2)
    assert len(in_process) == len(in_workers) == 8
    for a, b in zip(in_process, in_workers):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    for batch in in_workers:
        for j in range(len(batch["start"])):
            assert_window_matches({k: v[j] for k, v in batch.items()}, episodes)
    other_seed = batches(ds, seed=8, workers=0)
    assert not all(torch.equal(a["start"], b["start"]) for a, b in zip(in_process, other_seed))


class StorageProcessProbe(torch.utils.data.Dataset):
    """Windows plus the pid that opened the storage and the pid that read the window."""

    def __init__(self, windows: WindowDataset) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i):
        item = self.windows[i]
        item["opened_in"] = torch.tensor(self.windows.stores[0]._backend_pid)
        item["read_in"] = torch.tensor(os.getpid())
        return item


def test_hdf5_workers_open_their_own_file(minari_root):
    episodes = make_episodes(10, [20, 14], (16, 16, 3), DISCRETE)
    write_minari("test/workers-v0", episodes, image_space(), DISCRETE, "hdf5", False)
    ds = WindowDataset("test/workers-v0", T)
    ds[0]  # the parent holds an open HDF5 file when the workers fork
    assert ds.stores[0]._backend_pid == os.getpid()
    loader = DataLoader(StorageProcessProbe(ds), batch_size=4, num_workers=2)
    windows = 0
    for batch in loader:
        assert torch.equal(batch["opened_in"], batch["read_in"])
        assert (batch["read_in"] != os.getpid()).all()
        for j in range(len(batch["start"])):
            assert_window_matches({k: v[j] for k, v in batch.items()}, episodes)
            windows += 1
    assert windows == len(ds) == 13 + 7


def test_sampler_orders(loader_dataset):
    ds = WindowDataset(loader_dataset[0], T)
    n = len(ds)
    one_pass = list(WindowSampler(ds, seed=1))
    assert sorted(one_pass) == list(range(n))
    assert one_pass == list(WindowSampler(ds, seed=1))
    epoch1 = WindowSampler(ds, seed=1)
    epoch1.set_epoch(1)
    assert list(epoch1) != one_pass and sorted(epoch1) == list(range(n))
    two_passes = list(WindowSampler(ds, seed=1, num_samples=2 * n))
    assert sorted(two_passes) == sorted(list(range(n)) * 2)
    drawn = list(WindowSampler(ds, seed=1, num_samples=500, replacement=True))
    assert len(drawn) == 500 and 0 <= min(drawn) and max(drawn) < n
    ranks = [list(WindowSampler(ds, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    # The ranks split one order: disjoint except for the wrap-around padding.
    assert len(set().union(*map(set, ranks))) == n
    assert sum(map(len, ranks)) - n < 3


def test_pickled_dataset_reopens_its_storage(loader_dataset):
    path, episodes = loader_dataset
    ds = WindowDataset(path, T)
    before = ds[17]
    copy = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives
    assert all(store._backend is None for store in copy.stores)
    after = copy[17]
    for key in before:
        assert torch.equal(before[key], after[key])


# ------------------------------------------------------------------------- several datasets
def test_several_sources(tmp_path):
    first = make_episodes(8, [20, 10], (16, 16, 3), DISCRETE)
    second = make_episodes(9, [15, 4, 9], (16, 16, 3), DISCRETE)
    a = write_worldsim(tmp_path, "test/a-v0", first, image_space(), DISCRETE)
    b = write_worldsim(tmp_path, "test/b-v0", second, image_space(), DISCRETE)
    ds = WindowDataset([a, b], T)
    assert len(ds) == (13 + 3) + (8 + 2)
    by_source = {0: first, 1: second}
    sources = []
    for i in range(len(ds)):
        item = ds[i]
        sources.append(int(item["source"]))
        assert_window_matches(item, by_source[int(item["source"])])
    assert sources == [0] * 16 + [1] * 10


def test_mismatched_datasets_are_named(tmp_path):
    a = write_random(tmp_path, "test/a-v0", [12])
    b = write_random(tmp_path, "test/b-v0", [12], action_space=BOX)
    c = write_random(tmp_path, "test/c-v0", [12], frame_shape=(8, 8, 3))
    with pytest.raises(DatasetError, match=r"a-v0.*b-v0.*different action spaces"):
        WindowDataset([a, b], T)
    with pytest.raises(DatasetError, match=r"a-v0.*c-v0.*different frame shapes"):
        WindowDataset([a, c], T)


# ------------------------------------------------------------------------------- bad input
def test_dataset_without_image_observations(tmp_path):
    space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    writer = DatasetWriter("test/vector-v0", space, DISCRETE, root=tmp_path)
    writer.append(still_episode(np.zeros((13, 4), np.float32)))
    with pytest.raises(DatasetError, match=r"vector-v0/data/metadata.json.*no image observations"):
        WindowDataset(writer.path, T)


def test_unknown_dataset_id_and_bad_path(minari_root, tmp_path):
    unknown = r"unknown dataset id 'test/missing-v0'.*MINARI_DATASETS_PATH"
    with pytest.raises(DatasetError, match=unknown):
        WindowDataset("test/missing-v0", T)
    with pytest.raises(DatasetError, match=r"not a dataset id"):
        WindowDataset("no such thing", T)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: not a Minari dataset folder"):
        WindowDataset(tmp_path / "empty", T)


def test_window_longer_than_every_episode(tmp_path):
    path = write_random(tmp_path, "test/short-v0", [5, 9, 7])
    too_long = r"no episode in .*short-v0.* has 10 steps.*longest has 9"
    with pytest.raises(DatasetError, match=too_long):
        WindowDataset(path, 10)
    assert len(WindowDataset(path / "data", 9)) == 1  # the data/ folder works as a source too


def test_missing_metadata_key_and_missing_episode_file(tmp_path):
    path = write_random(tmp_path, "test/broken-v0", [12, 12])
    meta_path = path / "data" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "action_space"}))
    missing_key = r"broken-v0/data/metadata.json: missing key 'action_space'"
    with pytest.raises(DatasetError, match=missing_key):
        EpisodeStore(path)
    meta_path.write_text(json.dumps(meta))

    (path / "data" / "1" / "part-0.arrow").unlink()
    ds = WindowDataset(path, T)
    ds[0]  # episode 0 is intact
    with pytest.raises(DatasetError, match=r"broken-v0/data/1: no .arrow file for episode 1"):
        ds[len(ds) - 1]


def test_parquet_is_refused_with_a_way_out(minari_root):
    episodes = make_episodes(0, [12], (16, 16, 3), DISCRETE)
    write_minari("test/parquet-v0", episodes, image_space(), DISCRETE, "parquet", False)
    with pytest.raises(DatasetError, match=r"metadata.json: data_format 'parquet'.*convert"):
        WindowDataset("test/parquet-v0", T)


# ---------------------------------------------------------------------------------- benchmark
def test_measure_loader_reports_each_worker_count(loader_dataset):
    threads = torch.get_num_threads()
    result = measure_loader(
        loader_dataset[0], window=T, batch_size=4, workers=(0, 2), seconds=0.3, torch_threads=1
    )
    assert torch.get_num_threads() == threads  # restored
    assert result["torch_threads"] == 1
    assert result["frame_shape"] == [16, 16, 3] and result["num_windows"] == 53 + 38 + 43
    for workers in (0, 2):
        assert result["windows_per_s"][workers] > 0
        assert result["megabytes_per_s"][workers] == pytest.approx(
            result["windows_per_s"][workers] * T * 16 * 16 * 3 / 1e6
        )


def test_bytes_changed_after_writing_stop_the_loader_naming_the_file(tmp_path):
    episodes = make_episodes(2, LENGTHS, (16, 16, 3), DISCRETE)
    path = write_worldsim(tmp_path, "test/flip-v0", episodes, image_space(), DISCRETE)
    part = Path(path) / "data" / "2" / "part-0.arrow"
    recorded = json.loads((part.parent / "metadata.json").read_text())["sha256"]
    assert set(recorded) == {"part-0.arrow"}
    data = bytearray(part.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    part.write_bytes(bytes(data))  # 4 KiB of noise inside the frames: still a readable Arrow file

    ds = WindowDataset(path, T)
    first = next(i for i in range(len(ds)) if ds.locate(i)[1] == 2)
    with pytest.raises(DatasetError, match=r"2/part-0.arrow: corrupt \(its sha256 is .*2/metadata.json recorded"):
        ds[first]
    assert_window_matches(ds[0], episodes)  # the untouched episodes still read
