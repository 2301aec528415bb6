"""A training pack: Minari episodes in a compact folder that a machine without Gymnasium or Minari reads.

The GPU training job (`worldsim.train.gpu_job`, docs/gpu.md) runs on a lent machine that has torch,
numpy and OpenCV but no gymnasium / minari / mujoco, and that receives at most 64 MiB of files in
all (the repository included). `write_pack` (`worldsim pack`) turns datasets into such a folder;
`open_pack` reads it back with numpy (+ cv2, or imageio-ffmpeg when cv2 is missing) only.

Layout:

    manifest.json        format, version, sources, frame shape, action space (as JSON), video
                         settings, one entry per episode (source, episode, steps, offset, video
                         file, PSNR of the packed frames), what `--max-mib` dropped, and the sha256
                         of every other file
    videos/ep_000000.mp4 frames o_0 .. o_{N-1} of each episode (N = its steps; the final
                         observation o_N is never part of a training window, `data.windows`)
    actions.npy          (total steps, *action shape) as the dataset gives them (int64 | float32)
    rewards.npy          (total steps,) float32
    terminations.npy     (total steps,) bool
    truncations.npy      (total steps,) bool

Episode i's steps are rows offset_i .. offset_i + N_i - 1 of the arrays, frame t of its video is
o_t, and action t (taken at o_t) led to o_{t+1}: the window convention of `worldsim.data.windows`.

Format choice, measured on `mm9-train-v1` (64x64 Memory Maze frames, 2 episodes = 1,200 frames;
the bundle's "small" codec, latents 16x8x8 of std 1.07):

    what                              KiB/frame   PSNR vs raw   codec latent error (rms / std)
    H.264 yuv420p CRF 18                 0.36        36.2 dB        3.6 %
    H.264 yuv444p CRF 18                 0.34        39.4 dB        2.9 %
    H.264 yuv444p CRF 12 (default)       0.58        43.2 dB        1.7 %
    H.264 yuv444p CRF 8                  0.81        45.5 dB
    H.264 yuv444p QP 0                   1.87        51.8 dB   (not lossless: RGB -> YUV rounding)
    latents uint8, per-channel scale     1.00 (0.76 zlib-9)         0.9 %
    latents float16                      2.00 (1.68 zlib-9)         ~0

The whole 60,000-frame dataset packs to 41.3 MiB at the default (yuv444p, CRF 12: 0.71 KiB/frame
over all 100 episodes, mean PSNR 42.2 dB; 95 s on one core), while its latents would take 59 MiB as
uint8 (~44 MiB zlib-compressed) and 117 MiB as float16. Only the video pack fits the ~38 MiB that
the 64 MiB carry leaves next to the repository (`DEFAULT_MAX_MIB`; at that cap the walk data keeps
92 of its 100 episodes; CRF 13 keeps all 100 in 37.7 MiB at 41.6 dB). It is also
independent of the codec (the job encodes frames with whatever codec it trains with; a latent
pack would be void as soon as the codec changed). Its error is small where it matters: the codec's
reconstruction PSNR of decoded-video frames equals that of the raw frames (26.47 vs 26.48 dB), and
the latent error (1.7 % of the latent std) is far below the noise levels the diffusion model
trains at (sigma ~ 0.2-2). Chroma at full resolution (yuv444p) is closer to the raw frames than
yuv420p at the same size (39.4 vs 36.2 dB at CRF 18): 64x64 frames have little colour to spare. Decoding costs nothing that
matters: ~6,000 frames/s per core with cv2 (bit-identical to ffmpeg's own decoder).

Integrity: `open_pack` checks the manifest's format, version and sizes and (by default) every
file's sha256; `PackError` names the file that is missing, corrupt or inconsistent.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from worldsim.utils.atomic import atomic_write_json, replace_dir, sha256_file
from worldsim.utils.format_json import read_format_json

FORMAT = "worldsim-pack"
VERSION = 1
MANIFEST_FILE = "manifest.json"
VIDEO_DIR = "videos"
ARRAYS = {"actions": None, "rewards": np.float32, "terminations": np.bool_, "truncations": np.bool_}
DEFAULT_CRF = 12
DEFAULT_PIX_FMT = "yuv444p"
DEFAULT_MAX_MIB = 38.0
"""The 64 MiB a lent machine's call carries, less the repository (about 25 MB: the dream's bundle and
the memory pair's two) and a margin; tests/test_pack.py checks that the two still fit together."""
MIN_TRIMMED_STEPS = 64
"""An episode cut to fit `max_mib` keeps at least this many steps, else it is dropped whole."""
MANIFEST_RESERVE = 4096 + 256  # bytes kept free for the manifest: a fixed part + per episode (below)
MANIFEST_PER_EPISODE = 320


class PackError(ValueError):
    """A pack that cannot be written or read as asked; the message names the file."""


# ------------------------------------------------------------------------------ video i/o
def _video_params(crf: int, pix_fmt: str) -> list[str]:
    # -threads 1: the pack is made on a shared 2-core machine; x264 does ~1,400 64x64 frames/s on one.
    return ["-crf", str(int(crf)), "-preset", "medium", "-threads", "1"]


def encode_video(path: Path, frames: np.ndarray, *, crf: int = DEFAULT_CRF, pix_fmt: str = DEFAULT_PIX_FMT) -> None:
    """uint8 (N, H, W, 3) RGB frames -> an H.264 mp4 at `path` (imageio-ffmpeg's bundled ffmpeg)."""
    import imageio_ffmpeg  # here: the GPU machine reads packs with cv2 and may lack imageio-ffmpeg (module doc)

    n, h, w, c = frames.shape
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), pix_fmt_in="rgb24", pix_fmt_out=pix_fmt, fps=10, codec="libx264", quality=None,
        macro_block_size=1, output_params=_video_params(crf, pix_fmt), ffmpeg_log_level="error",
    )  # fmt: skip
    writer.send(None)  # start ffmpeg
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


def video_backend() -> str:
    """"cv2" when OpenCV imports (the GPU machine has it), else "ffmpeg" (imageio-ffmpeg)."""
    try:
        import cv2  # noqa: F401

        return "cv2"
    except ImportError:
        return "ffmpeg"


def decode_video(path: str | os.PathLike, frames: int, frame_shape: tuple[int, int, int],
                 backend: str | None = None) -> np.ndarray:
    """The `frames` frames of an mp4 as uint8 (frames, H, W, 3) RGB; PackError naming the file
    when it does not decode to exactly that many frames of that shape."""
    path = Path(path)
    if not path.is_file():
        raise PackError(f"{path}: missing video")
    backend = backend or video_backend()
    out = np.empty((frames, *frame_shape), dtype=np.uint8)
    n = 0
    if backend == "cv2":
        import cv2  # optional: cv2 may be missing; video_backend() then picks imageio-ffmpeg

        cap = cv2.VideoCapture(str(path))
        try:
            if not cap.isOpened():
                raise PackError(f"{path}: OpenCV cannot open this video (corrupt file?)")
            while True:
                ok, bgr = cap.read()
                if not ok:
                    break
                if n >= frames or bgr.shape != frame_shape:
                    raise PackError(f"{path}: holds more than {frames} frames or frames of shape {bgr.shape}, "
                                    f"the manifest says {frames} of {tuple(frame_shape)}")
                out[n] = bgr[:, :, ::-1]  # OpenCV decodes to BGR
                n += 1
        finally:
            cap.release()
    elif backend == "ffmpeg":
        import imageio_ffmpeg  # optional: the fallback when cv2 is missing (the GPU machine may lack it)

        try:
            reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24", output_params=["-threads", "1"])
            meta = next(reader)
            size = tuple(meta.get("size", ()))
            if size != (frame_shape[1], frame_shape[0]):
                raise PackError(f"{path}: frames of {size} (w, h), the manifest says {frame_shape[1]}x{frame_shape[0]}")
            for buf in reader:
                if n >= frames:
                    raise PackError(f"{path}: holds more than the {frames} frames the manifest says")
                out[n] = np.frombuffer(buf, np.uint8).reshape(frame_shape)
                n += 1
        except (RuntimeError, OSError, StopIteration) as e:
            raise PackError(f"{path}: ffmpeg cannot decode this video ({e})") from None
    else:
        raise ValueError(f"unknown video backend {backend!r} (cv2 or ffmpeg)")
    if n != frames:
        raise PackError(f"{path}: decodes to {n} frames, the manifest says {frames} (truncated or corrupt video)")
    return out


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over frames of the per-frame PSNR (uint8 range), capped at 100 dB for identical frames."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = np.square(diff).reshape(len(a), -1).mean(axis=1)
    return float(np.mean(np.minimum(100.0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)))))


# ------------------------------------------------------------------------------ writing
def action_space_json(space) -> dict[str, Any]:
    """The dataset's action space as plain JSON (what the world model needs: kind and size)."""
    # here, not at the top: this module must import without gymnasium or minari (the GPU machine, module doc)
    import gymnasium as gym
    from minari.serialization import serialize_space  # minari: likewise absent on the GPU machine

    if isinstance(space, gym.spaces.Discrete):
        out = {"type": "discrete", "n": int(space.n), "shape": [], "dtype": "int64"}
    elif isinstance(space, gym.spaces.Box):
        out = {"type": "box", "shape": [int(v) for v in space.shape], "dtype": "float32",
               "low": np.asarray(space.low, dtype=np.float64).tolist(),
               "high": np.asarray(space.high, dtype=np.float64).tolist()}
    else:
        raise PackError(f"the world model takes Discrete or Box actions; the dataset has {space}")
    out["minari"] = serialize_space(space)
    return out


def _npy_bytes(rows: int, item_shape: tuple[int, ...], dtype) -> int:
    return 128 + rows * int(np.prod(item_shape, dtype=np.int64)) * np.dtype(dtype).itemsize


@dataclass
class PackSummary:
    path: Path
    episodes: int
    steps: int
    bytes: int
    seconds: float
    dropped_episodes: int
    dropped_steps: int
    trimmed: list[tuple[int, int, int]]
    """(pack episode, steps kept, steps it had)"""
    mean_psnr_db: float
    notes: list[str]


def write_pack(
    sources: list[str],
    out: str | os.PathLike,
    *,
    crf: int = DEFAULT_CRF,
    pix_fmt: str = DEFAULT_PIX_FMT,
    max_mib: float | None = DEFAULT_MAX_MIB,
    max_episodes: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PackSummary:
    """Pack the episodes of `sources` (Minari ids or folders) into the folder `out` (module doc).

    Episodes are taken in order (dataset by dataset). With `max_mib`, the first episode that would
    push the pack past the cap is cut to fit (if at least MIN_TRIMMED_STEPS steps fit) and every
    later one is dropped; what was dropped is logged and recorded in the manifest. The folder is
    built beside `out` and renamed into place, so a killed run leaves no half pack.
    """
    # here, not at the top: write_pack runs where worldsim is installed; the GPU machine reads packs with numpy (+ cv2) only
    from tqdm import tqdm

    from worldsim.data.episode_store import EpisodeStore  # imports gymnasium and minari (see above)

    if not sources:
        raise PackError("nothing to pack: give at least one dataset")
    if not 0 <= crf <= 51:
        raise PackError(f"crf must be in 0..51 (x264), got {crf}")
    if pix_fmt not in ("yuv444p", "yuv420p"):
        raise PackError(f"pix_fmt must be yuv444p or yuv420p, got {pix_fmt!r}")
    if max_mib is not None and max_mib <= 0:
        raise PackError(f"max_mib must be > 0, got {max_mib}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise PackError(f"{out} already exists; pass --overwrite to replace it")
    stores = [EpisodeStore(s) for s in sources]
    first = stores[0]
    space = action_space_json(first.action_space)
    for other in stores[1:]:
        if action_space_json(other.action_space)["minari"] != space["minari"] or other.frame_shape != first.frame_shape:
            raise PackError(f"datasets {first.name!r} and {other.name!r} differ in action space or frame shape "
                            f"({first.action_space}, {first.frame_shape} vs {other.action_space}, {other.frame_shape})")
    frame_shape = tuple(int(v) for v in first.frame_shape)
    if frame_shape[2] != 3:
        raise PackError(f"{first.name}: frames are {frame_shape}; a pack holds RGB frames (H, W, 3)")
    action_shape = tuple(space["shape"])
    action_dtype = np.int64 if space["type"] == "discrete" else np.float32

    todo = [(si, e, int(s.episode_steps[e])) for si, s in enumerate(stores) for e in range(len(s))
            if int(s.episode_steps[e]) >= 1]
    if max_episodes is not None:
        todo = todo[:max_episodes]
    total_steps = sum(n for _, _, n in todo)
    cap = None if max_mib is None else int(max_mib * 2**20)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / VIDEO_DIR).mkdir(parents=True)
    start = time.perf_counter()
    episodes: list[dict[str, Any]] = []
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ARRAYS}
    video_bytes, kept_steps, trimmed, dropped, notes = 0, 0, [], [], []
    full = False  # the cap is reached: every later episode is dropped

    def fixed_bytes(n_steps: int, n_episodes: int) -> int:
        """Bytes of everything but the videos for a pack of n_steps steps in n_episodes episodes."""
        arrays = sum(_npy_bytes(n_steps, action_shape, action_dtype) if c == "actions" else _npy_bytes(n_steps, (), dtype)
                     for c, dtype in ARRAYS.items())
        return arrays + MANIFEST_RESERVE + 2 * len(json.dumps(space)) + MANIFEST_PER_EPISODE * n_episodes

    bar = tqdm(total=total_steps, desc="packing", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for si, ep, steps in todo:
            if full:
                dropped.append((si, ep, steps))
                continue
            data = stores[si].read(ep, 0, steps)
            name = f"{VIDEO_DIR}/ep_{len(episodes):06d}.mp4"
            file = tmp / name
            encode_video(file, data["frames"], crf=crf, pix_fmt=pix_fmt)
            size, keep = file.stat().st_size, steps
            if cap is not None and video_bytes + size + fixed_bytes(kept_steps + steps, len(episodes) + 1) > cap:
                full = True
                # Cut the episode to what its measured bytes per step say fits (5 % margin),
                # re-encode, and shrink further while it still does not fit.
                room = cap - video_bytes - fixed_bytes(kept_steps, len(episodes) + 1)
                per_step = size / steps + fixed_bytes(1, 0) - fixed_bytes(0, 0)
                keep = int(max(0, room) / per_step * 0.95)
                while keep >= MIN_TRIMMED_STEPS:
                    encode_video(file, data["frames"][:keep], crf=crf, pix_fmt=pix_fmt)
                    size = file.stat().st_size
                    if video_bytes + size + fixed_bytes(kept_steps + keep, len(episodes) + 1) <= cap:
                        break
                    keep = int(keep * 0.9)
                if keep < MIN_TRIMMED_STEPS:
                    file.unlink(missing_ok=True)
                    dropped.append((si, ep, steps))
                    bar.update(steps)
                    continue
                trimmed.append((len(episodes), keep, steps))
            decoded = decode_video(file, keep, frame_shape)
            episodes.append({
                "source": si, "episode": int(ep), "steps": int(keep), "offset": int(kept_steps), "video": name,
                "psnr_db": round(psnr_db(data["frames"][:keep], decoded), 3),
                **({"trimmed_from": int(steps)} if keep != steps else {}),
            })  # fmt: skip
            for c in ARRAYS:
                columns[c].append(np.asarray(data[c][:keep]))
            video_bytes += size
            kept_steps += keep
            bar.update(steps)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        for s in stores:
            s.close()
    if not episodes:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PackError(f"not even {MIN_TRIMMED_STEPS} steps of the first episode fit in --max-mib {max_mib}")

    dropped_steps = sum(n for _, _, n in dropped) + sum(had - kept for _, kept, had in trimmed)
    for pack_ep, kept, had in trimmed:
        notes.append(f"pack episode {pack_ep} cut to {kept} of its {had} steps to fit {max_mib:g} MiB")
    if dropped:
        notes.append(f"{len(dropped)} of {len(todo)} episodes ({sum(n for _, _, n in dropped)} steps) dropped to fit "
                     f"{max_mib:g} MiB: (dataset, episode) {[(si, e) for si, e, _ in dropped][:6]}"
                     f"{' ...' if len(dropped) > 6 else ''}")
    try:
        files: dict[str, str] = {}
        for c, dtype in ARRAYS.items():
            arr = np.concatenate(columns[c]).astype(dtype if dtype is not None else action_dtype, copy=False)
            np.save(tmp / f"{c}.npy", arr, allow_pickle=False)
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                files[f.relative_to(tmp).as_posix()] = sha256_file(f)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "kind": "frames-h264",
            "sources": [{"name": s.name, "path": str(s.data_path.resolve())} for s in stores],
            "frame_shape": list(frame_shape),
            "action_space": space,
            "video": {"codec": "h264", "pix_fmt": pix_fmt, "crf": int(crf), "frames": "o_0 .. o_{N-1} per episode"},
            "codec_sha256": None,  # frames, not latents: any codec can encode them
            "total_steps": int(kept_steps),
            "episodes": episodes,
            "dropped": {"episodes": len(dropped), "steps": int(dropped_steps),
                        "trimmed": [list(t) for t in trimmed], "max_mib": max_mib, "notes": notes},
            "files": files,
        }
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for line in notes:
        log(f"note: {line}")
    size = pack_bytes(out)
    return PackSummary(
        path=out, episodes=len(episodes), steps=kept_steps, bytes=size, seconds=time.perf_counter() - start,
        dropped_episodes=len(dropped), dropped_steps=dropped_steps, trimmed=trimmed,
        mean_psnr_db=float(np.mean([e["psnr_db"] for e in episodes])), notes=notes,
    )  # fmt: skip


def pack_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ------------------------------------------------------------------------------ reading
@dataclass
class Pack:
    """An opened, checked pack. Arrays are memory-mapped; frames are decoded on demand."""

    path: Path
    manifest: dict[str, Any]
    actions: np.ndarray
    rewards: np.ndarray
    terminations: np.ndarray
    truncations: np.ndarray

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["frame_shape"])

    @property
    def action_space(self) -> dict[str, Any]:
        return self.manifest["action_space"]

    @property
    def episodes(self) -> list[dict[str, Any]]:
        return self.manifest["episodes"]

    @property
    def episode_steps(self) -> np.ndarray:
        return np.array([e["steps"] for e in self.episodes], dtype=np.int64)

    @property
    def offsets(self) -> np.ndarray:
        return np.array([e["offset"] for e in self.episodes], dtype=np.int64)

    @property
    def total_steps(self) -> int:
        return int(self.manifest["total_steps"])

    def __len__(self) -> int:
        return len(self.episodes)

    def frames(self, episode: int, backend: str | None = None) -> np.ndarray:
        """uint8 (steps, H, W, 3): frames o_0 .. o_{steps-1} of pack episode `episode`."""
        e = self.episodes[episode]
        return decode_video(self.path / e["video"], int(e["steps"]), self.frame_shape, backend)

    def all_frames(self, workers: int | None = None, backend: str | None = None) -> np.ndarray:
        """uint8 (total steps, H, W, 3): every episode's frames in order (rows match the arrays).
        Episodes decode in parallel threads (the decoders release the GIL)."""
        out = np.empty((self.total_steps, *self.frame_shape), dtype=np.uint8)
        workers = workers or min(16, os.cpu_count() or 1)

        def one(i: int) -> None:
            e = self.episodes[i]
            out[e["offset"] : e["offset"] + e["steps"]] = self.frames(i, backend)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(one, range(len(self))))
        return out


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise PackError(f"{path}: not a pack (no {MANIFEST_FILE}); make one with `worldsim pack`")
    manifest = read_format_json(file, FORMAT, VERSION, what="a pack manifest", version_label="pack", error=PackError)
    if manifest.get("kind") != "frames-h264":
        raise PackError(f"{file}: pack kind {manifest.get('kind')!r}; this code reads 'frames-h264'")
    return manifest


def open_pack(path: str | os.PathLike, *, verify: bool = True) -> Pack:
    """Open and check a pack: manifest, every file's sha256 (verify=True), array lengths and
    episode offsets. PackError names the first file that is missing, corrupt or inconsistent."""
    folder = Path(path)
    manifest = read_manifest(folder)
    mfile = folder / MANIFEST_FILE
    files = manifest.get("files") or {}
    needed = [f"{c}.npy" for c in ARRAYS] + [e["video"] for e in manifest["episodes"]]
    for name in needed:
        if name not in files:
            raise PackError(f"{mfile}: lists no sha256 for {name}")
    for name, digest in files.items():
        file = folder / name
        if not file.is_file():
            raise PackError(f"{file}: missing from the pack (listed in {mfile})")
        if verify and sha256_file(file) != digest:
            raise PackError(f"{file}: corrupt (its sha256 differs from {mfile}); re-copy or re-make the pack")
    total = int(manifest["total_steps"])
    offset = 0
    for i, e in enumerate(manifest["episodes"]):
        if e["offset"] != offset or e["steps"] < 1:
            raise PackError(f"{mfile}: episode {i} has offset {e['offset']} and {e['steps']} steps, expected offset {offset}")
        offset += e["steps"]
    if offset != total:
        raise PackError(f"{mfile}: episodes hold {offset} steps, total_steps says {total}")
    arrays = {}
    for c in ARRAYS:
        file = folder / f"{c}.npy"
        try:
            arr = np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise PackError(f"{file}: not a readable .npy file ({e})") from None
        want = (total, *manifest["action_space"]["shape"]) if c == "actions" else (total,)
        if arr.shape != tuple(want):
            raise PackError(f"{file}: shape {arr.shape}, the manifest says {tuple(want)}")
        arrays[c] = arr
    return Pack(path=folder, manifest=manifest, **arrays)
