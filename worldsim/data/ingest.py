"""Convert published Minecraft recordings into a Minari dataset (`worldsim ingest`).

Every episode found under the input folder is read by its format's reader, resized to
size x size frames, mapped to the shared action encoding (`minecraft/actions.py`) and appended
through `DatasetWriter`, which commits one episode at a time atomically.

Resuming and duplicates: each episode records its source path (`source_file`) and a sha256 of its
video and action files (`source_sha256`, see `content_hash`) in its metadata. A source whose path
or content is already in the dataset is skipped, so running the same ingestion again continues
where it stopped (a killed run loses at most one episode), the same recording copied under another
name is ingested once, and moving the input folder before a resume adds nothing twice. The dataset
is created only when the first episode is ready, so an input whose first file is bad leaves no
empty dataset behind.

Bad input (missing partner file, empty episode folder, corrupt or truncated video/npz/jsonl,
unsupported MineRL data version, count mismatch, unknown action) stops the run with one error
naming the file, leaving the episodes already committed intact; with `skip_bad=True` the episode is
reported and skipped instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from worldsim.data.minari_writer import METADATA_FILE, DatasetWriter, Episode, dataset_dir
from worldsim.data.minecraft import actions, minerl_v04, teco, vpt
from worldsim.data.minecraft.video import RecordingError


class Reader(NamedTuple):
    """How one published format is found and read."""

    find_episodes: Callable[[Path], list[Path]]
    read_episode: Callable[[Path, int], Episode]
    source_files: Callable[[Path], list[Path]]  # what `content_hash` reads for one episode
    layout: str  # shown when a folder holds no episodes


READERS: dict[str, Reader] = {
    minerl_v04.FORMAT: Reader(
        minerl_v04.find_episodes, minerl_v04.read_episode, minerl_v04.source_files,
        "<env>/<stream>/recording.mp4 + rendered.npz + metadata.json",
    ),
    vpt.FORMAT: Reader(
        vpt.find_episodes, vpt.read_episode, vpt.source_files, "<id>.mp4 + <id>.jsonl"
    ),
    teco.FORMAT: Reader(
        teco.find_episodes, teco.read_episode, teco.source_files,
        "<id>.mp4 + <id>.npz ('actions'), or <id>.npz with 'video' and 'actions'",
    ),
}  # fmt: skip
SOURCE_FORMATS: tuple[str, ...] = tuple(READERS)
MIN_SIZE = 8
_HASH_CHUNK_BYTES = 1 << 20


@dataclass
class IngestSummary:
    """What one `ingest` call did."""

    dataset_path: Path
    found: int
    added: int = 0
    already_present: int = 0  # by path or by content
    # Sources found by content under another path: (source, the committed episode's source_file).
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (source, error) when skip_bad
    total_episodes: int = 0
    total_steps: int = 0


def observation_space(size: int) -> gym.spaces.Box:
    return gym.spaces.Box(0, 255, (size, size, 3), np.uint8)


def ingest(
    source_format: str,
    input_dir: str | Path,
    dataset_id: str,
    root: str | Path | None = None,
    size: int = 64,
    *,
    skip_bad: bool = False,
    vpt_cursor: bool = True,
    progress: bool = True,
) -> IngestSummary:
    """Convert every `source_format` episode under `input_dir` into the Minari dataset `dataset_id`.

    source_format: one of SOURCE_FORMATS ('minerl-v0.4', 'vpt', 'teco').
    root:          datasets folder; default Minari's (MINARI_DATASETS_PATH or ~/.minari/datasets).
    size:          frames are resized to size x size RGB.
    skip_bad:      report and skip episodes whose files are bad instead of stopping.
    vpt_cursor:    draw the mouse cursor into VPT frames with a GUI open, as VPT's loader does.
    """
    if source_format not in READERS:
        raise ValueError(f"unknown source format {source_format!r}; choose one of "
                         f"{', '.join(SOURCE_FORMATS)}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: input folder does not exist")
    reader = READERS[source_format]
    read_episode = reader.read_episode
    if source_format == vpt.FORMAT:
        read_episode = partial(vpt.read_episode, draw_cursor=vpt_cursor)
    sources = reader.find_episodes(input_dir)
    if not sources:
        raise RecordingError(f"{input_dir}: no {source_format} episodes found "
                             f"(expected {reader.layout})")

    summary = IngestSummary(dataset_path=dataset_dir(dataset_id, root), found=len(sources))
    writer = _open_existing(dataset_id, root, size)
    committed = _Committed.read(writer)

    bar = tqdm(sources, desc=f"ingest {source_format}", unit="episode", disable=not progress)
    for source in bar:
        if str(Path(source).resolve()) in committed.paths:
            summary.already_present += 1
            continue
        digest = content_hash(reader.source_files(source))
        if digest is not None and digest in committed.hashes:
            summary.already_present += 1
            summary.duplicates.append((str(source), committed.hashes[digest]))
            bar.write(f"skipped duplicate: {source} has the content of {committed.hashes[digest]}")
            continue
        try:
            episode = read_episode(source, size)
        except RecordingError as e:
            if not skip_bad:
                raise
            summary.bad.append((str(source), str(e)))
            bar.write(f"skipped bad episode: {e}")
            continue
        episode.metadata["source_sha256"] = digest
        episode.metadata["info_layout"] = info_layout(episode.infos)
        committed.check_info_layout(source, episode.metadata["info_layout"], dataset_id)
        if writer is None:
            writer = _create(dataset_id, root, size, source_format)
        writer.append(episode)
        committed.add(episode.metadata)
        summary.added += 1
        bar.set_postfix(added=summary.added, bad=len(summary.bad))
    bar.close()

    if writer is not None:
        formats = writer.metadata.get("source_formats", [])
        if summary.added and source_format not in formats:
            writer.update_dataset_metadata(source_formats=[*formats, source_format])
        summary.total_episodes = writer.total_episodes
        summary.total_steps = writer.total_steps
    return summary


def content_hash(paths: list[Path]) -> str | None:
    """sha256 over an episode's source files in the reader's order, each named only by its suffix
    and size, so the same recording under another name or folder hashes the same. None when a
    file is missing: reading the episode then reports it."""
    digest = hashlib.sha256()
    for path in paths:
        if not path.is_file():
            return None
        digest.update(f"{path.suffix} {path.stat().st_size}\n".encode())
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def _writer(dataset_id: str, root: str | Path | None, size: int, **kwargs: Any) -> DatasetWriter:
    return DatasetWriter(
        dataset_id, observation_space(size), actions.action_space(), root=root, **kwargs
    )


def _open_existing(dataset_id: str, root: str | Path | None, size: int) -> DatasetWriter | None:
    """Reopen a dataset to resume it, after checking that it uses our action encoding."""
    path = dataset_dir(dataset_id, root) / "data" / METADATA_FILE
    if not path.exists():
        return None
    writer = _writer(dataset_id, root, size)  # checks spaces (so also the frame size)
    found = writer.metadata.get("action_encoding")
    if found != actions.ENCODING_NAME:
        raise ValueError(
            f"{path}: dataset uses action encoding {found!r}, not {actions.ENCODING_NAME!r}; "
            "ingest into a new dataset id instead"
        )
    return writer


def _create(
    dataset_id: str, root: str | Path | None, size: int, source_format: str
) -> DatasetWriter:
    return _writer(
        dataset_id, root, size,
        description=(
            f"Minecraft recordings ({source_format}) at {size}x{size}, actions in the "
            f"{actions.ENCODING_NAME} encoding (see worldsim/data/minecraft/actions.py)"
        ),
        algorithm_name="human or scripted Minecraft play (recorded)",
        extra_metadata={
            "action_encoding": actions.ENCODING_NAME,
            "action_names": list(actions.ACTION_NAMES),
            "frame_size": size,
            "source_formats": [source_format],
        },
    )  # fmt: skip


def info_layout(infos: dict[str, np.ndarray]) -> dict[str, str]:
    """Each info key's type and per-step shape, e.g. {'observation$compass$angle': 'float64'}."""
    layout = {}
    for key, value in infos.items():
        kind = "str" if value.dtype.kind == "U" else str(value.dtype)
        layout[key] = kind + (str(list(value.shape[1:])) if value.ndim > 1 else "")
    return layout


@dataclass
class _Committed:
    """What the dataset holds, read from its episodes' metadata (committed atomically with them)."""

    paths: set[str] = field(default_factory=set)
    hashes: dict[str, str] = field(default_factory=dict)  # source_sha256 -> source_file
    info_layout: dict[str, str] = field(default_factory=dict)  # of the first episode with infos

    @classmethod
    def read(cls, writer: DatasetWriter | None) -> _Committed:
        committed = cls()
        for meta in writer.episode_metadata() if writer else []:
            committed.add(meta)
        return committed

    def add(self, meta: dict[str, Any]) -> None:
        # Episodes written before hashes were recorded are matched by path only.
        if "source_file" in meta:
            self.paths.add(str(meta["source_file"]))
        if meta.get("source_sha256"):
            self.hashes[str(meta["source_sha256"])] = str(meta.get("source_file"))
        if not self.info_layout and meta.get("info_layout"):
            self.info_layout = dict(meta["info_layout"])

    def check_info_layout(self, source: Path, layout: dict[str, str], dataset_id: str) -> None:
        """Minari reads a dataset's episodes as one arrow table, so every episode that has infos
        must have the same keys and types (episodes without infos mix in fine)."""
        if layout and self.info_layout and layout != self.info_layout:
            differ = sorted(set(layout.items()) ^ set(self.info_layout.items()))
            raise ValueError(
                f"{source}: its step infos differ from those already in {dataset_id} (first "
                f"difference: {differ[0][0]!r}); Minari needs one infos layout per dataset, so "
                "ingest each MineRL environment into its own dataset id"
            )
