"""Read MineRL v0.4 demonstrations without the `minerl` package.

Published layout (one folder per demonstration, grouped by environment):

    <root>/MineRLTreechop-v0/v3_<stream>/recording.mp4    the player's view (64x64 in v0.4)
                                        /rendered.npz     per-tick arrays, '$'-separated keys
                                        /metadata.json    stream_name, success, duration_steps,
                                                          total_reward, true_video_frame_count

`rendered.npz` holds `reward` (N,), one `action$<name>` array per action (N steps, e.g.
`action$forward` (N,), `action$camera` (N, 2) [pitch, yaw] degrees, `action$place` item names) and
`observation$...` arrays (N + 1 states, e.g. `observation$inventory$log`). MineRL's publisher
shifted actions one tick forward, so action t is taken in state t and leads to state t + 1 with
reward t: an episode has N + 1 states and N actions.

The video has *more* frames than states: the recording starts while the world is loading and the
publisher cut the first ticks. MineRL's own loader aligns video and states by their ends (the last
frame is the last state), skipping the first `true_video_frame_count - (N + 1)` frames; so do we.
MineRL's loader also overwrites the very last frame with the one before it; we keep the real last
frame (nothing in the format says it is broken).

The recordings do not say whether the environment ended the episode (`success` is computed from
the rewards), so every episode ends truncated, not terminated; `success` is kept in the metadata.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from worldsim.data.minari_writer import Episode
from worldsim.data.minecraft.actions import encode_minerl_columns
from worldsim.data.minecraft.video import RecordingError, read_video

FORMAT = "minerl-v0.4"
VIDEO_FILE = "recording.mp4"
ARRAYS_FILE = "rendered.npz"
METADATA_FILE = "metadata.json"
KEY_SEPARATOR = "$"
ACTION_PREFIX = "action" + KEY_SEPARATOR
OBSERVATION_PREFIX = "observation" + KEY_SEPARATOR
REWARD_KEY = "reward"


def find_episodes(input_dir: Path) -> list[Path]:
    """Every demonstration folder under `input_dir`: any folder holding one of the three files,
    so that a folder missing a file is reported instead of silently ignored."""
    folders = {
        path.parent
        for name in (VIDEO_FILE, ARRAYS_FILE, METADATA_FILE)
        for path in Path(input_dir).rglob(name)
    }
    return sorted(folders)


def read_episode(episode_dir: Path, size: int = 64) -> Episode:
    """Load one demonstration folder as an Episode of (N + 1) frames, N actions and N rewards."""
    episode_dir = Path(episode_dir)
    for name in (VIDEO_FILE, ARRAYS_FILE, METADATA_FILE):
        if not (episode_dir / name).is_file():
            raise RecordingError(f"{episode_dir / name}: missing (a MineRL v0.4 episode has "
                                 f"{VIDEO_FILE}, {ARRAYS_FILE} and {METADATA_FILE})")
    meta = _read_metadata(episode_dir / METADATA_FILE)
    arrays = _read_arrays(episode_dir / ARRAYS_FILE)

    npz_path = episode_dir / ARRAYS_FILE
    if REWARD_KEY not in arrays:
        raise RecordingError(f"{npz_path}: missing key {REWARD_KEY!r}")
    rewards = arrays[REWARD_KEY]
    if rewards.ndim != 1 or not np.issubdtype(rewards.dtype, np.number) or len(rewards) == 0:
        raise RecordingError(f"{npz_path}: {REWARD_KEY!r} must be a non-empty 1-D number array, "
                             f"got {rewards.shape} {rewards.dtype}")
    num_steps = len(rewards)
    action_columns = {
        key[len(ACTION_PREFIX):]: value
        for key, value in arrays.items()
        if key.startswith(ACTION_PREFIX)
    }
    if not action_columns:
        raise RecordingError(f"{npz_path}: no '{ACTION_PREFIX}...' keys (not a MineRL npz?)")
    for key, value in arrays.items():
        states = len(value) if value.ndim else 0
        if key.startswith(OBSERVATION_PREFIX) and states != num_steps + 1:
            raise RecordingError(f"{npz_path}: {key!r} has {states} entries, expected "
                                 f"{num_steps + 1} (one more state than the {num_steps} rewards)")
    try:
        actions, dropped = encode_minerl_columns(action_columns, num_steps)
    except ValueError as e:
        raise RecordingError(f"{npz_path}: {e}") from None

    video_path = episode_dir / VIDEO_FILE
    declared = meta.get("true_video_frame_count")
    frames, info = read_video(
        video_path, size,
        expected_frames=int(declared) if declared is not None else None,
        counted_by=f"{episode_dir / METADATA_FILE} (true_video_frame_count)",
    )  # fmt: skip
    num_states = num_steps + 1
    if len(frames) < num_states:
        raise RecordingError(f"{video_path}: has {len(frames)} frames, fewer than the "
                             f"{num_states} states described by {npz_path}")
    leading = len(frames) - num_states

    truncations = np.zeros(num_steps, bool)
    truncations[-1] = True
    return Episode(
        observations=frames[leading:],
        actions=actions,
        rewards=rewards.astype(np.float64),
        terminations=np.zeros(num_steps, bool),
        truncations=truncations,
        metadata={
            "source_format": FORMAT,
            "source_file": str(episode_dir.resolve()),
            "environment": episode_dir.parent.name,
            "stream_name": meta.get("stream_name", episode_dir.name),
            "success": meta.get("success"),
            "original_resolution": [info.width, info.height],
            "fps": info.fps,
            "leading_frames_skipped": leading,
            "dropped_actions": dropped,
        },
    )


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordingError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(meta, dict):
        raise RecordingError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    declared = meta.get("true_video_frame_count")
    if declared is not None and (not isinstance(declared, int) or declared <= 0):
        raise RecordingError(f"{path}: true_video_frame_count must be a positive integer, "
                             f"got {declared!r}")
    return meta


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the npz, read eagerly so a damaged member fails here, naming the file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise RecordingError(f"{path}: corrupt or truncated npz ({e})") from None
    except ValueError as e:  # object arrays need pickle, which could run code: refuse them
        raise RecordingError(f"{path}: unreadable npz ({e})") from None
