"""Read MineRL v0.4 demonstrations without the `minerl` package.

Published layout (one folder per demonstration, grouped by environment):

    <root>/VERSION                                        the data version: 3 or 4 for v0.4
    <root>/MineRLTreechop-v0/v3_<stream>/recording.mp4    the player's view (64x64 in v0.4)
                                        /rendered.npz     per-tick arrays, '$'-separated keys
                                        /metadata.json    stream_name, success, duration_steps,
                                                          total_reward, true_video_frame_count

MineRL v0.4's loader accepts data versions 3 and 4 only, read from `<root>/VERSION` or, without
that file, from the `v<N>_` prefix of the stream folders; we apply the same check and refuse other
versions (their keys and alignment differ).

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

Non-image observations: every `observation$...` array (e.g. Navigate's `observation$compass$angle`
and `observation$inventory$dirt`, ObtainDiamond's `observation$inventory$<item>` and
`observation$equipped_items$mainhand$type`) goes to the episode's step infos under its npz name,
entry t describing state t (frame t); the image observation stays a plain Box so that MineRL,
VPT and TECO datasets share one observation space. Values are widened to int64 / float64 / bool /
str so that a key has one arrow type in every episode (Minari reads a dataset's infos as one table;
`ingest.py` refuses an episode whose keys differ from the dataset's). Other npz keys, if any, are
listed in the metadata as `unused_npz_keys`.

Terminated or truncated: each v0.4 task's env ends the episode when its goal is reached, on the
step that pays the goal reward (Navigate: touching the diamond block, +100; Treechop: the 64th log,
+1 each; ObtainIronPickaxe / ObtainDiamond: the iron pickaxe, 256 / the diamond, 1024). Read back
from the rewards, a goal reached on the last step is a termination (`goal_reached` in the
metadata); otherwise the player quit or time ran out, a truncation. Tasks without such a goal
(e.g. BASALT, no rewards) always end truncated. The published `success` flag (computed from the
rewards by MineRL's publisher, with looser rules for the Obtain tasks) is kept in the metadata.
"""

from __future__ import annotations

import json
import re
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
EPISODE_FILES = (VIDEO_FILE, ARRAYS_FILE, METADATA_FILE)
VERSION_FILE = "VERSION"
SUPPORTED_DATA_VERSIONS = (3, 4)  # what MineRL v0.4's own loader accepts
STREAM_VERSION_PREFIX = re.compile(r"v(\d+)_")  # MineRL names stream folders v<version>_<id>
KEY_SEPARATOR = "$"
ACTION_PREFIX = "action" + KEY_SEPARATOR
OBSERVATION_PREFIX = "observation" + KEY_SEPARATOR
REWARD_KEY = "reward"

# Tasks whose env ends the episode when the goal is reached, and the reward paid on that step
# (the v0.4 env specs' quit handlers and reward schedules). Treechop's goal is a total instead.
GOAL_STEP_REWARDS: dict[str, float] = {
    "MineRLNavigate": 100.0,  # touching the diamond block
    "MineRLObtainIronPickaxe": 256.0,  # holding an iron pickaxe
    "MineRLObtainDiamond": 1024.0,  # holding a diamond
}
TREECHOP_GOAL_TOTAL = 64.0  # the 64th log, +1 reward each
# Navigate's Dense variants add the tick's distance gain (well under a block) to the goal reward.
DENSE_SHAPING_MARGIN = 1.0


def find_episodes(input_dir: Path) -> list[Path]:
    """Every demonstration folder under `input_dir`: any folder holding one of the three files,
    plus every folder without subfolders (a stream folder left empty), so that a folder missing a
    file, or all of them, is reported instead of silently ignored. Hidden folders are skipped."""
    input_dir = Path(input_dir)
    with_files = {path.parent for name in EPISODE_FILES for path in input_dir.rglob(name)}
    folders = [p for p in input_dir.rglob("*") if p.is_dir()]
    leaves = {
        folder
        for folder in folders
        if not any(part.startswith(".") for part in folder.relative_to(input_dir).parts)
        and not any(child.is_dir() for child in folder.iterdir())
    }
    return sorted(with_files | leaves)


def source_files(episode_dir: Path) -> list[Path]:
    """The video and action files of one demonstration (their content identifies it)."""
    return [Path(episode_dir) / VIDEO_FILE, Path(episode_dir) / ARRAYS_FILE]


def read_episode(episode_dir: Path, size: int = 64) -> Episode:
    """Load one demonstration folder as an Episode of (N + 1) frames, N actions and N rewards,
    with the N + 1 states' non-image observations in its infos."""
    episode_dir = Path(episode_dir)
    if not episode_dir.is_dir():
        raise RecordingError(f"{episode_dir}: not a folder (a MineRL v0.4 episode is one)")
    if not any((episode_dir / name).is_file() for name in EPISODE_FILES):
        what = "holds none of the episode files" if any(episode_dir.iterdir()) else "is empty"
        raise RecordingError(f"{episode_dir}: episode folder {what} (a MineRL v0.4 episode has "
                             f"{VIDEO_FILE}, {ARRAYS_FILE} and {METADATA_FILE})")
    for name in EPISODE_FILES:
        if not (episode_dir / name).is_file():
            raise RecordingError(f"{episode_dir / name}: missing (a MineRL v0.4 episode has "
                                 f"{VIDEO_FILE}, {ARRAYS_FILE} and {METADATA_FILE})")
    version = data_version(episode_dir)
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
    observations = {
        key: _observation_column(npz_path, key, value, num_steps + 1)
        for key, value in arrays.items()
        if key.startswith(OBSERVATION_PREFIX)
    }
    known_prefixes = (ACTION_PREFIX, OBSERVATION_PREFIX)
    unused = sorted(k for k in arrays if k != REWARD_KEY and not k.startswith(known_prefixes))
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

    environment = episode_dir.parent.name
    goal_reached = reached_goal(environment, rewards)
    terminations = np.zeros(num_steps, bool)
    truncations = np.zeros(num_steps, bool)
    terminations[-1] = goal_reached is True  # the task's env ended the episode there
    truncations[-1] = not terminations[-1]  # the player quit or time ran out
    return Episode(
        observations=frames[leading:],
        actions=actions,
        rewards=rewards.astype(np.float64),
        terminations=terminations,
        truncations=truncations,
        infos=observations,
        metadata={
            "source_format": FORMAT,
            "source_file": str(episode_dir.resolve()),
            "environment": environment,
            "stream_name": meta.get("stream_name", episode_dir.name),
            "data_version": version,
            "success": meta.get("success"),
            "goal_reached": goal_reached,
            "original_resolution": [info.width, info.height],
            "fps": info.fps,
            "leading_frames_skipped": leading,
            "dropped_actions": dropped,
            "unused_npz_keys": unused,
        },
    )


def data_version(episode_dir: Path) -> int:
    """The MineRL data version of a demonstration, checked as MineRL v0.4's loader checks it: the
    data root's VERSION file (<root>/<env>/<stream>), else the stream folder's `v<N>_` prefix."""
    version_path = episode_dir.parent.parent / VERSION_FILE
    if version_path.is_file():
        text = version_path.read_text(errors="replace").strip()
        if not text.isdigit():
            raise RecordingError(f"{version_path}: expected a MineRL data version number, "
                                 f"got {text[:40]!r}")
        version, source = int(text), version_path
    else:
        prefix = STREAM_VERSION_PREFIX.match(episode_dir.name)
        if prefix is None:
            raise RecordingError(
                f"{episode_dir}: cannot tell the MineRL data version (no {VERSION_FILE} file in "
                f"{version_path.parent} and the folder name lacks MineRL's 'v<N>_' prefix)"
            )
        version, source = int(prefix.group(1)), episode_dir
    if version not in SUPPORTED_DATA_VERSIONS:
        supported = " or ".join(map(str, SUPPORTED_DATA_VERSIONS))
        raise RecordingError(f"{source}: MineRL data version {version} is not supported (MineRL "
                             f"v0.4's loader reads version {supported} only)")
    return version


def reached_goal(environment: str, rewards: np.ndarray) -> bool | None:
    """Whether the episode's last step reached its task's goal, which makes the env end it, judged
    from the rewards; None for tasks without a known goal (their episodes end truncated)."""
    if environment.startswith("MineRLTreechop"):
        return bool(rewards.sum() >= TREECHOP_GOAL_TOTAL)
    for prefix, goal_reward in GOAL_STEP_REWARDS.items():
        if environment.startswith(prefix):
            return bool(rewards[-1] >= goal_reward - DENSE_SHAPING_MARGIN)
    return None


def _observation_column(npz_path: Path, key: str, value: np.ndarray, num_states: int) -> np.ndarray:
    """One observation array checked (one entry per state) and widened to int64 / float64 / bool /
    str, so that the same key stores the same arrow type in every episode of a dataset."""
    states = len(value) if value.ndim else 0
    if states != num_states:
        raise RecordingError(f"{npz_path}: {key!r} has {states} entries, expected {num_states} "
                             f"(one more state than the {num_states - 1} rewards)")
    widened = {"b": bool, "i": np.int64, "u": np.int64, "f": np.float64, "U": str, "S": str}
    if value.dtype.kind not in widened:
        raise RecordingError(f"{npz_path}: {key!r} has unsupported dtype {value.dtype} "
                             "(expected numbers, booleans or text)")
    return value.astype(widened[value.dtype.kind])


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
    if not isinstance(meta.get("success", False), bool):
        raise RecordingError(f"{path}: success must be true or false, got {meta['success']!r}")
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
