"""Read the TECO Minecraft release (Yan et al. 2022, "Temporally Consistent Transformers").

Published layout: `<split>/<worker>/<id>.mp4` (300 frames of 128x128) beside `<id>.npz` holding
`actions`, an int array with one entry per frame. TECO's loader also accepts an npz that carries
the frames itself as `video` (T, H, W, 3) uint8 (its DMLab release, and the npz mode of the
collection script); such an npz needs no mp4 and its lossless frames are preferred when both exist.

The actions come from TECO's collection script (wilson1yan/collect-minecraft), which records a
placeholder 0 before the first frame and then `id + 1` for the action that produced each next frame:

    id  meaning (MineRL action sent)                   encoding
    --  ---------------------------------------------  ---------------------------
     0  nothing: marks the first frame                 (not an action; dropped)
     1  forward=1, jump=1, camera [0, 0]               forward + jump
     2  forward=0, jump=1, camera [0, -20] (turn left)  jump, camera_yaw = -20
     3  forward=0, jump=1, camera [0, +20] (turn right) jump, camera_yaw = +20

So `actions[t]` for t >= 1 is the action between frames t - 1 and t, and an episode of T frames
has T - 1 actions. Ambiguity: an earlier revision of that script turned without jumping; the
released "marsh" data was collected by the revision with jump held on every action, which is the
one encoded here. TECO's configs size the action table at 6, but only ids 0-3 are ever written;
anything else is rejected. The release has no rewards (all 0) and no terminal states: every clip
ends truncated (time ran out, the world did not end).
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from worldsim.data.minari_writer import Episode
from worldsim.data.minecraft.actions import YAW, button_index, noop_actions
from worldsim.data.minecraft.video import RecordingError, find_paired_recordings, read_video, resize_frames

FORMAT = "teco"
TURN_DEGREES = 20.0
FIRST_FRAME_MARKER = 0


def _action_table() -> np.ndarray:
    """Row i = the shared encoding of TECO action id i (row 0 is never used as an action)."""
    table = noop_actions(4)
    table[1:, button_index("jump")] = 1.0
    table[1, button_index("forward")] = 1.0
    table[2, YAW] = -TURN_DEGREES
    table[3, YAW] = TURN_DEGREES
    return table


ACTION_TABLE = _action_table()


def find_episodes(input_dir: Path) -> list[Path]:
    """The `<id>.npz` of every episode under `input_dir`, including ids with only an mp4
    (reading those reports the missing action file instead of silently skipping them)."""
    return find_paired_recordings(input_dir, ".npz", ".mp4")


def source_files(npz_path: Path) -> list[Path]:
    """The files one episode is read from (their content identifies it, `ingest.py`): the actions
    npz, and the mp4 when there is one (an npz may carry the frames itself)."""
    video_path = Path(npz_path).with_suffix(".mp4")
    return [Path(npz_path), *([video_path] if video_path.is_file() else [])]


def read_episode(npz_path: Path, size: int = 64) -> Episode:
    """Load one episode as T frames and T - 1 actions (rewards are 0)."""
    npz_path = Path(npz_path)
    video_path = npz_path.with_suffix(".mp4")
    if not npz_path.is_file():
        raise RecordingError(f"{npz_path}: missing (every TECO video needs its actions npz)")
    ids, raw_video = _read_npz(npz_path)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise RecordingError(f"{npz_path}: 'actions' must be a 1-D integer array, "
                             f"got {ids.shape} {ids.dtype}")
    if len(ids) < 2:
        raise RecordingError(f"{npz_path}: needs at least 2 frames, 'actions' has {len(ids)}")
    unknown = ids[(ids < 0) | (ids >= len(ACTION_TABLE))]
    if len(unknown):
        raise RecordingError(f"{npz_path}: unknown TECO action id {int(unknown[0])} "
                             f"(known: 0-{len(ACTION_TABLE) - 1})")
    if ids[0] != FIRST_FRAME_MARKER:
        raise RecordingError(f"{npz_path}: actions[0] is {int(ids[0])}, expected the first-frame "
                             f"marker {FIRST_FRAME_MARKER} (is this a TECO actions file?)")

    if raw_video is not None:
        if raw_video.ndim != 4 or raw_video.shape[-1] != 3 or raw_video.dtype != np.uint8:
            raise RecordingError(f"{npz_path}: 'video' must be (T, H, W, 3) uint8, "
                                 f"got {raw_video.shape} {raw_video.dtype}")
        if len(raw_video) != len(ids):
            raise RecordingError(f"{npz_path}: 'video' has {len(raw_video)} frames but 'actions' "
                                 f"has {len(ids)} entries (one per frame expected)")
        frames = resize_frames(raw_video, size)
        resolution, fps, frames_from = [raw_video.shape[2], raw_video.shape[1]], None, npz_path
    else:
        if not video_path.is_file():
            raise RecordingError(f"{video_path}: missing, and {npz_path} has no 'video' array")
        frames, info = read_video(
            video_path, size, expected_frames=len(ids), counted_by=f"{npz_path} ('actions')"
        )
        resolution, fps, frames_from = [info.width, info.height], info.fps, video_path

    num_steps = len(ids) - 1
    truncations = np.zeros(num_steps, bool)
    truncations[-1] = True  # fixed-length clips: time ran out, the world did not end
    return Episode(
        observations=frames,
        actions=ACTION_TABLE[ids[1:]],
        rewards=np.zeros(num_steps),
        terminations=np.zeros(num_steps, bool),
        truncations=truncations,
        metadata={
            "source_format": FORMAT,
            "source_file": str(npz_path.resolve()),
            "frames_file": str(Path(frames_from).resolve()),
            "original_resolution": resolution,
            "fps": fps,
            "teco_action_counts": {str(i): int((ids[1:] == i).sum()) for i in range(1, 4)},
        },
    )


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "actions" not in npz.files:
                raise RecordingError(f"{path}: missing key 'actions' (found {sorted(npz.files)})")
            return npz["actions"], (npz["video"] if "video" in npz.files else None)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise RecordingError(f"{path}: corrupt or truncated npz ({e})") from None
    except ValueError as e:  # RecordingError is a ValueError too: let ours through unchanged
        if isinstance(e, RecordingError):
            raise
        raise RecordingError(f"{path}: unreadable npz ({e})") from None
