"""Decode Minecraft recordings (mp4) into small square RGB frames.

Decoding and resizing happen in one ffmpeg pass (the binary bundled with imageio-ffmpeg), so a
five-minute 640x360 VPT recording never exists in memory at full size: only the (N, size, size, 3)
uint8 result does (~74 MB for 6000 frames at 64x64 instead of ~4 GB).

Resizing squashes the frame to a square, as MineRL renders and as VPT's agent resizes its input.
Downscaling uses area averaging (every source pixel contributes, no aliasing of thin blocks);
upscaling, which only happens for sources smaller than `size`, is bilinear.

Any problem with a file raises `RecordingError`, whose message starts with the file's path.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

# ffmpeg's log can run to thousands of lines for a badly damaged file; the first few say why.
_MAX_LOG_LINES = 6
_ERROR_TAGS = ("[error]", "[fatal]", "[panic]")
_VIDEO_STREAM = re.compile(r"Stream #\d+:\d+.*?: Video: (\w+)")
_FRAME_SIZE = re.compile(r", (\d+)x(\d+)(?=[,\s\[]|$)")  # not the codec tag's "0x3163..."
_FPS = re.compile(r", ([\d.]+) fps")


class RecordingError(ValueError):
    """A source file is missing, unreadable, truncated or inconsistent with its partner files.

    The message names the file and the problem. `worldsim ingest --skip-bad` skips episodes that
    raise this error (and only this one: anything else is a bug, not bad data).
    """


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a recording, kept in each episode's metadata."""

    width: int
    height: int
    fps: float
    codec: str


def find_paired_recordings(input_dir: Path, key_suffix: str, partner_suffix: str) -> list[Path]:
    """The `<id><key_suffix>` path of every recording id under `input_dir` that has either file of
    the pair, so a recording missing its partner is reported when read instead of silently skipped."""
    found = [p for suffix in (key_suffix, partner_suffix) for p in Path(input_dir).rglob(f"*{suffix}")]
    stems = {p.with_suffix("") for p in found}
    return sorted(stem.with_suffix(key_suffix) for stem in stems)


def read_video(
    path: Path,
    size: int,
    *,
    expected_frames: int | None = None,
    counted_by: str = "",
) -> tuple[np.ndarray, VideoInfo]:
    """Decode every frame of `path` resized to (size, size): ((N, size, size, 3) uint8, info).

    With `expected_frames`, a different frame count is an error that names `counted_by` (the file
    or field that gave the expected count), e.g. a truncated video beside a complete action file.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordingError(f"{path}: missing video file")
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-nostats",
        # Info level for the input header (size, fps, codec), each line tagged with its level so
        # that decoding errors can be told apart: one ffmpeg run per file, no separate probe.
        "-loglevel", "level+info",
        "-i", str(path),
        "-map", "0:v:0", "-an", "-sn",
        # One output frame per decoded frame: the default would duplicate or drop frames to
        # reach a constant rate, breaking the frame <-> action alignment of variable-rate files.
        "-fps_mode", "passthrough",
        # Area averaging when shrinking; swscale falls back to bilinear when enlarging.
        "-vf", f"scale={size}:{size}:flags=area+accurate_rnd+full_chroma_int",
        "-pix_fmt", "rgb24", "-f", "rawvideo", "-",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, check=False)
    log = result.stderr.decode(errors="replace").splitlines()
    errors = [line for line in log if any(tag in line for tag in _ERROR_TAGS)]
    if result.returncode != 0:
        raise RecordingError(f"{path}: ffmpeg could not decode it ({_summarise(errors or log)})")
    if errors:
        # ffmpeg exits 0 on damaged streams (it conceals the damage) but logs them as errors.
        raise RecordingError(f"{path}: corrupt or truncated video stream ({_summarise(errors)})")

    frame_bytes = size * size * 3
    if len(result.stdout) % frame_bytes:
        raise RecordingError(f"{path}: decoder returned a partial frame (truncated video?)")
    frames = np.frombuffer(result.stdout, np.uint8).reshape(-1, size, size, 3)
    if len(frames) == 0:
        raise RecordingError(f"{path}: contains no video frames")
    if expected_frames is not None and len(frames) != expected_frames:
        source = counted_by or "the episode's action data"
        raise RecordingError(
            f"{path}: has {len(frames)} video frames but {source} describes {expected_frames} "
            "(truncated video or mismatched files?)"
        )
    return frames, _parse_input_header(path, log)


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize (N, H, W, 3) uint8 frames held in memory (npz videos, live env) like `read_video`."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (N, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    height, width = frames.shape[1:3]
    if (height, width) == (size, size):
        return frames.copy()
    downscale = width >= size and height >= size
    resample = Image.Resampling.BOX if downscale else Image.Resampling.BILINEAR
    out = np.empty((len(frames), size, size, 3), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize((size, size), resample))
    return out


def _parse_input_header(path: Path, log: list[str]) -> VideoInfo:
    """Size, fps and codec from ffmpeg's description of the input's video stream, e.g.
    `Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p, 640x360, 20 fps`."""
    for line in log:
        if line.endswith("Stream mapping:"):
            break  # the output streams follow; only the input's header matters
        stream = _VIDEO_STREAM.search(line)
        if stream:
            size = _FRAME_SIZE.search(line)
            fps = _FPS.search(line)
            if size is None:
                break
            return VideoInfo(
                width=int(size.group(1)), height=int(size.group(2)),
                fps=float(fps.group(1)) if fps else 0.0, codec=stream.group(1),
            )  # fmt: skip
    raise RecordingError(f"{path}: ffmpeg did not report the video stream's size")


def _summarise(lines: list[str]) -> str:
    lines = [line.strip() for line in lines if line.strip()]
    shown = "; ".join(lines[:_MAX_LOG_LINES])
    more = len(lines) - _MAX_LOG_LINES
    return shown + (f"; ... {more} more lines" if more > 0 else "") if lines else "no details"
