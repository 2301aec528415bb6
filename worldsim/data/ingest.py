"""Convert published Minecraft recordings into a Minari dataset (`worldsim ingest`).

Every episode found under the input folder is read by its format's reader, resized to
size x size frames, mapped to the shared action encoding (`minecraft/actions.py`) and appended
through `DatasetWriter`, which commits one episode at a time atomically.

Resuming: each episode records its source path in its metadata (`source_file`); running the same
ingestion again skips sources already committed, so a killed run loses at most one episode and
can simply be restarted. The dataset is created only when the first episode is ready, so an input
whose first file is bad leaves no empty dataset behind.

Bad input (missing partner file, corrupt or truncated video/npz/jsonl, count mismatch, unknown
action) stops the run with one error naming the file; with `skip_bad=True` the episode is
reported and skipped instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np

from worldsim.data.minari_writer import METADATA_FILE, DatasetWriter, Episode, dataset_dir
from worldsim.data.minecraft import actions, minerl_v04, teco, vpt
from worldsim.data.minecraft.video import RecordingError


class Reader(NamedTuple):
    """How one published format is found and read."""

    find_episodes: Callable[[Path], list[Path]]
    read_episode: Callable[[Path, int], Episode]
    layout: str  # shown when a folder holds no episodes


READERS: dict[str, Reader] = {
    minerl_v04.FORMAT: Reader(
        minerl_v04.find_episodes, minerl_v04.read_episode,
        "<env>/<stream>/recording.mp4 + rendered.npz + metadata.json",
    ),
    vpt.FORMAT: Reader(vpt.find_episodes, vpt.read_episode, "<id>.mp4 + <id>.jsonl"),
    teco.FORMAT: Reader(
        teco.find_episodes, teco.read_episode,
        "<id>.mp4 + <id>.npz ('actions'), or <id>.npz with 'video' and 'actions'",
    ),
}  # fmt: skip
SOURCE_FORMATS: tuple[str, ...] = tuple(READERS)
MIN_SIZE = 8


@dataclass
class IngestSummary:
    """What one `ingest` call did."""

    dataset_path: Path
    found: int
    added: int = 0
    already_present: int = 0
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
    progress: bool = True,
) -> IngestSummary:
    """Convert every `source_format` episode under `input_dir` into the Minari dataset `dataset_id`.

    source_format: one of SOURCE_FORMATS ('minerl-v0.4', 'vpt', 'teco').
    root:          datasets folder; default Minari's (MINARI_DATASETS_PATH or ~/.minari/datasets).
    size:          frames are resized to size x size RGB.
    skip_bad:      report and skip episodes whose files are bad instead of stopping.
    """
    from tqdm import tqdm

    if source_format not in READERS:
        raise ValueError(f"unknown source format {source_format!r}; choose one of "
                         f"{', '.join(SOURCE_FORMATS)}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: input folder does not exist")
    reader = READERS[source_format]
    sources = reader.find_episodes(input_dir)
    if not sources:
        raise RecordingError(f"{input_dir}: no {source_format} episodes found "
                             f"(expected {reader.layout})")

    summary = IngestSummary(dataset_path=dataset_dir(dataset_id, root), found=len(sources))
    writer = _open_existing(dataset_id, root, size)
    committed = _committed_sources(writer) if writer else set()

    bar = tqdm(sources, desc=f"ingest {source_format}", unit="episode", disable=not progress)
    for source in bar:
        if str(Path(source).resolve()) in committed:
            summary.already_present += 1
            continue
        try:
            episode = reader.read_episode(source, size)
        except RecordingError as e:
            if not skip_bad:
                raise
            summary.bad.append((str(source), str(e)))
            bar.write(f"skipped bad episode: {e}")
            continue
        if writer is None:
            writer = _create(dataset_id, root, size, source_format)
        writer.append(episode)
        committed.add(episode.metadata["source_file"])
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


def _committed_sources(writer: DatasetWriter) -> set[str]:
    return {str(meta["source_file"]) for meta in writer.episode_metadata() if "source_file" in meta}
