"""Read a few consecutive steps of one Minari dataset's episodes without loading whole episodes.

`EpisodeStore(source)` opens a Minari dataset given by id (looked up like Minari does:
MINARI_DATASETS_PATH or ~/.minari/datasets) or by path (the dataset folder or its `data/`
folder). Opening reads only JSON metadata and step counts; `read(episode, start, length)` then
slices the steps [start, start + length) out of storage:

- "arrow" (what worldsim writes, and any Minari arrow dataset): each episode is an Arrow IPC file
  `data/<id>/part-0.arrow`, memory-mapped, so a slice touches only the pages it covers. Minari
  pads actions / rewards / terminations / truncations to the number of observations (one extra
  row at the end); the padding row is never read.
- "hdf5" (Minari's default, for datasets made elsewhere): `main_data.hdf5` with one group
  `episode_<id>` per episode, sliced with h5py.

Image observations may be stored raw or JPEG-encoded (Minari's `jpeg_encoding`, its default);
JPEG frames are decoded one by one, only those of the slice. The observation space must be an image
(a uint8 Box of shape (H, W) or (H, W, C), C in 1, 3, 4) or a Dict holding one (pick it with
`image_key` when there are several). Frames always come back as (length, H, W, C).

File handles and memory maps are opened lazily, once per process: a store pickled into (or forked
into) a DataLoader worker reopens its files there instead of sharing the parent's.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.ipc
from minari.serialization import deserialize_space
from PIL import Image

from worldsim.data.minari_writer import dataset_dir
from worldsim.utils.atomic import check_sha256

METADATA_FILE = "metadata.json"
HDF5_FILE = "main_data.hdf5"
STEP_COLUMNS = ("actions", "rewards", "terminations", "truncations")
SUPPORTED_ACTION_SPACES = (
    gym.spaces.Discrete,
    gym.spaces.Box,
    gym.spaces.MultiDiscrete,
    gym.spaces.MultiBinary,
)


class DatasetError(ValueError):
    """A dataset that cannot be read as windows of image steps; the message names the file."""


# ------------------------------------------------------------------------------ locating data
def resolve_data_path(source: str | os.PathLike) -> Path:
    """The `data/` folder (the one holding `metadata.json`) of a dataset id or path."""
    path = Path(source).expanduser()
    if (path / "data" / METADATA_FILE).is_file():
        return path / "data"
    if (path / METADATA_FILE).is_file():
        return path
    if path.exists():
        raise DatasetError(
            f"{path}: not a Minari dataset folder (no {METADATA_FILE} in it or in its data/)"
        )
    try:
        folder = dataset_dir(str(source))
    except ValueError:
        raise DatasetError(
            f"{source!r}: no such path, and not a dataset id of the form "
            f"'[namespace/]name-v<version>'"
        ) from None
    if not (folder / "data" / METADATA_FILE).is_file():
        raise DatasetError(
            f"unknown dataset id {str(source)!r}: {folder / 'data' / METADATA_FILE} does not exist "
            f"(datasets are looked up in MINARI_DATASETS_PATH or ~/.minari/datasets)"
        )
    return folder / "data"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(value, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _required(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise DatasetError(f"{path}: missing key {key!r}")
    return meta[key]


def _space_from_metadata(meta: dict[str, Any], key: str, path: Path) -> gym.Space:
    try:
        return deserialize_space(_required(meta, key, path))
    except DatasetError:
        raise
    except Exception as e:  # minari raises bare KeyError / NotImplementedError / JSON errors
        raise DatasetError(f"{path}: cannot read {key} ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------- observation spaces
def is_frame_space(space: gym.Space) -> bool:
    """A uint8 Box laid out as an image, channels last: (H, W) or (H, W, C) with C in 1, 3, 4."""
    if not isinstance(space, gym.spaces.Box) or space.dtype != np.uint8:
        return False
    shape = space.shape
    return len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3, 4))


def find_image_key(space: gym.Space, image_key: str | None, where: str) -> str | None:
    """Which part of the observation space holds the frames: None for the space itself."""
    if isinstance(space, gym.spaces.Dict):
        frame_keys = [k for k, sub in space.spaces.items() if is_frame_space(sub)]
        if image_key is not None:
            if image_key not in space.spaces:
                raise DatasetError(
                    f"{where}: image_key {image_key!r} is not in the observation space "
                    f"(keys: {list(space.spaces)})"
                )
            if image_key not in frame_keys:
                raise DatasetError(
                    f"{where}: observation {image_key!r} is {space[image_key]}, not an image "
                    f"(a uint8 Box of shape (H, W) or (H, W, C)); image keys: {frame_keys}"
                )
            return image_key
        if len(frame_keys) == 1:
            return frame_keys[0]
        found = {k: str(sub) for k, sub in space.spaces.items()}
        if not frame_keys:
            raise DatasetError(f"{where}: no image observations in the Dict space {found}")
        raise DatasetError(
            f"{where}: several image observations {frame_keys}; choose one with image_key="
        )
    if image_key is not None:
        raise DatasetError(
            f"{where}: image_key {image_key!r} given but the observation space is {space}, "
            f"not a Dict"
        )
    if not is_frame_space(space):
        raise DatasetError(
            f"{where}: observation space {space} has no image observations "
            f"(need a uint8 Box of shape (H, W) or (H, W, C), or a Dict holding one)"
        )
    return None


def _frame_shape(space: gym.spaces.Box) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in space.shape)
    return shape if len(shape) == 3 else (*shape, 1)  # grayscale gets a channel axis


def _is_jpeg_stored(space: gym.Space, jpeg_encoding: bool) -> bool:
    # Minari JPEG-encodes only the spaces its own test calls an image (>= 32x32, bounds 0..255);
    # smaller uint8 Boxes stay raw even in a jpeg_encoding dataset.
    from minari.dataset.minari_storage import is_image_space

    return jpeg_encoding and is_image_space(space)


def _decode_jpegs(blobs: Any, frame_shape: tuple[int, int, int], where: str) -> np.ndarray:
    frames = np.empty((len(blobs), *frame_shape), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        data = blob if isinstance(blob, bytes) else np.asarray(blob, dtype=np.uint8).tobytes()
        try:
            image = np.asarray(Image.open(io.BytesIO(data)))
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
            raise DatasetError(f"{where}: undecodable JPEG frame ({e})") from None
        if image.ndim == 2:
            image = image[:, :, None]  # (H, W) -> (H, W, 1)
        if image.shape != frame_shape:
            raise DatasetError(
                f"{where}: JPEG frame of shape {image.shape}, observation space says {frame_shape}"
            )
        frames[i] = image
    return frames


def _action_dtype(space: gym.Space) -> np.dtype:
    return np.dtype(np.float32) if isinstance(space, gym.spaces.Box) else np.dtype(np.int64)


# ------------------------------------------------------------------------------ arrow storage
@dataclass
class _ArrowEpisode:
    """Zero-copy columns of one memory-mapped episode (frames already narrowed to the image)."""

    path: Path
    frames: Any  # pa.ChunkedArray
    actions: Any
    rewards: Any
    terminations: Any
    truncations: Any


def _check_episode_hashes(folder: Path, files: list[Path]) -> None:
    """DatasetError naming the file when an Arrow file's sha256 differs from the one its episode's
    metadata.json recorded when it was written (nothing recorded: an older dataset, unchecked)."""
    meta_file = folder / "metadata.json"
    recorded = _read_json(meta_file).get("sha256") if meta_file.is_file() else None
    if not isinstance(recorded, dict):
        return
    for file in files:
        check_sha256(file, recorded.get(file.name), DatasetError, recorded_by=str(meta_file),
                     remedy="restore the dataset from its source or re-collect it")


def _natural_key(path: Path) -> list[Any]:
    # "part-10" after "part-2": the order pyarrow wrote the parts in.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


class _ArrowEpisodes:
    """Memory-mapped Arrow IPC episodes, the most recently used few kept open."""

    def __init__(self, store: EpisodeStore, max_open: int) -> None:
        self._store = store
        self._max_open = max_open
        self._open: OrderedDict[int, _ArrowEpisode] = OrderedDict()
        self._verified: set[int] = set()

    def _episode(self, episode: int) -> _ArrowEpisode:
        if episode in self._open:
            self._open.move_to_end(episode)
            return self._open[episode]
        opened = self._open_episode(episode)
        self._open[episode] = opened
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)  # dropping the columns unmaps the file
        return opened

    def _open_episode(self, episode: int) -> _ArrowEpisode:
        folder = self._store.data_path / str(episode)
        files = sorted(folder.glob("*.arrow"), key=_natural_key)
        if not files:
            raise DatasetError(f"{folder}: no .arrow file for episode {episode}")
        if episode not in self._verified:  # once per process: hashing is ~10 ms per 600-frame episode
            _check_episode_hashes(folder, files)
            self._verified.add(episode)
        tables = []
        for file in files:
            try:
                # Reading an uncompressed IPC file (what Minari writes) from a memory map
                # copies nothing: the columns point into the mapped pages.
                tables.append(pa.ipc.open_file(pa.memory_map(str(file), "r")).read_all())
            except (pa.ArrowInvalid, OSError) as e:
                raise DatasetError(f"{file}: not a readable Arrow IPC file ({e})") from None
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        where = files[0] if len(files) == 1 else folder

        missing = [c for c in ("observations", *STEP_COLUMNS) if c not in table.column_names]
        if missing:
            raise DatasetError(f"{where}: missing columns {missing} (has {table.column_names})")
        steps = int(self._store.episode_steps[episode])
        if table.num_rows != steps + 1:
            raise DatasetError(
                f"{where}: {table.num_rows} rows, but the episode metadata says {steps} steps "
                f"({steps + 1} observations)"
            )
        frames = table.column("observations")
        key = self._store.image_key
        if key is not None:
            if not pa.types.is_struct(frames.type) or frames.type.get_field_index(key) < 0:
                raise DatasetError(f"{where}: observations column has no field {key!r}")
            index = frames.type.get_field_index(key)
            # StructArray.flatten() respects slice offsets, unlike reading the child buffers.
            frames = pa.chunked_array([chunk.flatten()[index] for chunk in frames.chunks])
        return _ArrowEpisode(
            path=where,
            frames=frames,
            actions=table.column("actions"),
            rewards=table.column("rewards"),
            terminations=table.column("terminations"),
            truncations=table.column("truncations"),
        )

    def read(self, episode: int, start: int, length: int) -> dict[str, np.ndarray]:
        ep = self._episode(episode)
        store = self._store
        frame_rows = ep.frames.slice(start, length)
        if store.frames_are_jpeg:
            frames = _decode_jpegs(
                frame_rows.to_pylist(), store.frame_shape, f"{ep.path} (episode {episode})"
            )
        else:
            frames = _fixed_size_rows(frame_rows, store.frame_shape, np.uint8, ep.path)
        action_rows = ep.actions.slice(start, length)
        if isinstance(store.action_space, gym.spaces.Discrete):
            actions = action_rows.to_numpy().astype(np.int64)
        else:
            actions = _fixed_size_rows(
                action_rows, store.action_space.shape, _action_dtype(store.action_space), ep.path
            )
        return {
            "frames": frames,
            "actions": actions,
            "rewards": ep.rewards.slice(start, length).to_numpy().astype(np.float32),
            "terminations": ep.terminations.slice(start, length).to_numpy().astype(bool),
            "truncations": ep.truncations.slice(start, length).to_numpy().astype(bool),
        }

    def close(self) -> None:
        self._open.clear()


def _fixed_size_rows(
    rows: Any, item_shape: tuple[int, ...], dtype: np.dtype, where: Path
) -> np.ndarray:
    """Rows of a FixedSizeList column as one new (len(rows), *item_shape) array."""
    if not pa.types.is_fixed_size_list(rows.type):
        raise DatasetError(f"{where}: expected a fixed-size list column, found {rows.type}")
    if rows.type.list_size != int(np.prod(item_shape)):
        raise DatasetError(
            f"{where}: rows of {rows.type.list_size} values, the space says {item_shape}"
        )
    # flatten() honours the slice offset; concatenate copies out of the memory map.
    parts = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in rows.chunks]
    values = np.concatenate(parts) if parts else np.empty(0, dtype)
    return values.astype(dtype, copy=False).reshape(len(rows), *item_shape)  # (L, *item_shape)


# ------------------------------------------------------------------------------- hdf5 storage
class _HDF5Episodes:
    """Minari's HDF5 layout: one `episode_<id>` group per episode in `main_data.hdf5`."""

    def __init__(self, store: EpisodeStore) -> None:
        self._store = store
        self._path = store.data_path / HDF5_FILE
        try:
            self._file = h5py.File(self._path, "r")
        except OSError as e:
            raise DatasetError(f"{self._path}: cannot open as HDF5 ({e})") from None
        self._checked: set[int] = set()

    def _group(self, episode: int) -> Any:
        name = f"episode_{episode}"
        if name not in self._file:
            raise DatasetError(f"{self._path}: no group {name!r}")
        group = self._file[name]
        if episode not in self._checked:
            self._check(group, episode)
            self._checked.add(episode)
        return group

    def _check(self, group: Any, episode: int) -> None:
        obs_key = "observations" if self._store.image_key is None else (
            f"observations/{self._store.image_key}"
        )
        missing = [k for k in (obs_key, *STEP_COLUMNS) if k not in group]
        if missing:
            raise DatasetError(f"{self._path}: {group.name} has no {missing}")
        steps = int(self._store.episode_steps[episode])
        lengths = {obs_key: steps + 1, **{k: steps for k in STEP_COLUMNS}}
        for key, want in lengths.items():
            if len(group[key]) != want:
                raise DatasetError(
                    f"{self._path}: {group.name}/{key} has {len(group[key])} rows, expected {want}"
                )

    def read(self, episode: int, start: int, length: int) -> dict[str, np.ndarray]:
        store = self._store
        group = self._group(episode)
        obs = group["observations"] if store.image_key is None else (
            group["observations"][store.image_key]
        )
        stop = start + length
        if store.frames_are_jpeg:
            frames = _decode_jpegs(obs[start:stop], store.frame_shape, f"{self._path}:{obs.name}")
        else:
            frames = np.asarray(obs[start:stop], dtype=np.uint8).reshape(
                length, *store.frame_shape
            )  # (L, H, W, C), grayscale gains its channel axis
        dtype = _action_dtype(store.action_space)
        actions = np.asarray(group["actions"][start:stop]).astype(dtype, copy=False)
        return {
            "frames": frames,
            "actions": actions.reshape(length, *store.action_space.shape),
            "rewards": np.asarray(group["rewards"][start:stop], dtype=np.float32),
            "terminations": np.asarray(group["terminations"][start:stop], dtype=bool),
            "truncations": np.asarray(group["truncations"][start:stop], dtype=bool),
        }

    def close(self) -> None:
        self._file.close()


def _hdf5_step_counts(data_path: Path, total_episodes: int) -> np.ndarray:
    path = data_path / HDF5_FILE
    steps = np.empty(total_episodes, dtype=np.int64)
    try:
        file = h5py.File(path, "r")
    except OSError as e:  # missing file, or not HDF5
        raise DatasetError(f"{path}: cannot open as HDF5 ({e})") from None
    with file:
        for i in range(total_episodes):
            name = f"episode_{i}"
            if name not in file:
                raise DatasetError(f"{path}: no group {name!r} (metadata says {total_episodes})")
            group = file[name]
            if "total_steps" in group.attrs:
                steps[i] = int(group.attrs["total_steps"])
            elif "rewards" in group:
                steps[i] = len(group["rewards"])  # a shape lookup, no data read
            else:
                raise DatasetError(
                    f"{path}: {name} has neither a total_steps attribute nor rewards"
                )
    return steps


def _arrow_step_counts(data_path: Path, total_episodes: int) -> np.ndarray:
    steps = np.empty(total_episodes, dtype=np.int64)
    for i in range(total_episodes):
        path = data_path / str(i) / METADATA_FILE
        steps[i] = int(_required(_read_json(path), "total_steps", path))
    return steps


# ---------------------------------------------------------------------------------- the store
class EpisodeStore:
    """Read access to one Minari dataset's image episodes, by slices of steps.

    `read(episode, start, length)` returns numpy arrays of the steps [start, start + length):
    "frames" uint8 (L, H, W, C): the observations o_start .. o_{start+L-1}; "actions" (L,) int64
    (Discrete) or (L, *shape) float32 (Box) / int64 (MultiDiscrete, MultiBinary); "rewards"
    float32 (L,); "terminations", "truncations" bool (L,). Requires start + length <= steps.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        image_key: str | None = None,
        max_open_episodes: int = 64,
    ) -> None:
        self.name = str(source)
        self.data_path = resolve_data_path(source)
        meta_path = self.data_path / METADATA_FILE
        meta = _read_json(meta_path)
        self.data_format = str(_required(meta, "data_format", meta_path))
        if self.data_format == "parquet":
            raise DatasetError(
                f"{meta_path}: data_format 'parquet' cannot be sliced without reading whole "
                f"episodes; convert it to 'arrow' (load it with minari.load_dataset and append "
                f"its episodes with worldsim.data.minari_writer.DatasetWriter)"
            )
        if self.data_format not in ("arrow", "hdf5"):
            raise DatasetError(
                f"{meta_path}: unknown data_format {self.data_format!r} (known: arrow, hdf5)"
            )
        self.jpeg_encoding = bool(meta.get("jpeg_encoding", True))  # Minari's default
        self.observation_space = _space_from_metadata(meta, "observation_space", meta_path)
        self.action_space = _space_from_metadata(meta, "action_space", meta_path)
        if not isinstance(self.action_space, SUPPORTED_ACTION_SPACES):
            raise DatasetError(
                f"{meta_path}: action space {self.action_space} is not supported "
                f"(Discrete, Box, MultiDiscrete or MultiBinary)"
            )
        self.image_key = find_image_key(self.observation_space, image_key, str(meta_path))
        image_space = (
            self.observation_space
            if self.image_key is None
            else self.observation_space[self.image_key]
        )
        self.frame_shape = _frame_shape(image_space)
        self.frames_are_jpeg = _is_jpeg_stored(image_space, self.jpeg_encoding)

        total_episodes = int(_required(meta, "total_episodes", meta_path))
        count_steps = _arrow_step_counts if self.data_format == "arrow" else _hdf5_step_counts
        self.episode_steps = count_steps(self.data_path, total_episodes)
        self._max_open = max_open_episodes
        self._backend: _ArrowEpisodes | _HDF5Episodes | None = None
        self._backend_pid: int | None = None

    def __len__(self) -> int:
        return len(self.episode_steps)

    def __repr__(self) -> str:
        return (
            f"EpisodeStore({self.name!r}, {self.data_format}, {len(self)} episodes, "
            f"frames {self.frame_shape}, actions {self.action_space})"
        )

    def _storage(self) -> _ArrowEpisodes | _HDF5Episodes:
        # A DataLoader worker forked after the parent read something inherits the parent's
        # handles; HDF5 handles must not be shared across processes, so each process opens its own.
        if self._backend is None or self._backend_pid != os.getpid():
            if self.data_format == "arrow":
                self._backend = _ArrowEpisodes(self, self._max_open)
            else:
                self._backend = _HDF5Episodes(self)
            self._backend_pid = os.getpid()
        return self._backend

    def read(self, episode: int, start: int, length: int) -> dict[str, np.ndarray]:
        if not 0 <= episode < len(self):
            raise IndexError(f"{self.name}: episode {episode} out of range (0..{len(self) - 1})")
        steps = int(self.episode_steps[episode])
        if length < 1 or start < 0 or start + length > steps:
            raise IndexError(
                f"{self.name}: steps [{start}, {start + length}) are outside episode {episode} "
                f"({steps} steps)"
            )
        return self._storage().read(episode, start, length)

    def close(self) -> None:
        if self._backend is not None and self._backend_pid == os.getpid():
            self._backend.close()
        self._backend = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_backend"] = None  # open files and memory maps do not travel to other processes
        state["_backend_pid"] = None
        return state
