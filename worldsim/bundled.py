"""The bundled default model: a small world model, its codec and a few real context clips shipped
inside the package, so dreams work right after install, offline.

A bundle is one folder (written by `write_bundle`, through `scripts/bundle_model.py`):

    model.json          format, version, model config, sigma_data, stored dtype, maze size,
                        provenance (training step, datasets, date, source checkpoint), metrics,
                        where each clip came from, and the sha256 of every file below
    model.safetensors   inference weights only (EMA by default), float16 or float32 on disk;
                        loading always gives a float32 model
    codec.safetensors + codec.json   the frame codec, in the codec's own checkpoint format
    clips.safetensors   frames uint8 (N, T, H, W, 3) and actions int64 (N, T - 1): action t led
                        from frame t to frame t + 1

It differs from a training checkpoint on purpose: no optimizer, RNG or raw weights (a few MB
instead of tens), and the codec travels inside instead of being named by an absolute path.

Where: `$WORLDSIM_BUNDLE_DIR` when set (tests, or a bundle kept outside the package), else
`worldsim/assets/dream-memory-maze-9x9`. Every load checks the sha256 of each file, so a
truncated or swapped file is named in the error instead of dreaming garbage.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from safetensors import safe_open

from worldsim.codec import checkpoint as codec_ckpt
from worldsim.model.config import ModelConfig
from worldsim.model.world_model import WorldModel
from worldsim.rollout.context import ClipContext
from worldsim.utils.atomic import atomic_write_bytes, atomic_write_json, replace_dir, sha256_file
from worldsim.utils.format_json import read_format_json
from worldsim.utils.safetensors_io import safetensors_bytes, tensor_diff

FORMAT = "worldsim-bundle"
VERSION = 1
BUNDLE_NAME = "dream-memory-maze-9x9"
PACKAGE_BUNDLE_DIR = Path(__file__).parent / "assets" / BUNDLE_NAME
ENV_VAR = "WORLDSIM_BUNDLE_DIR"
MANIFEST_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
CLIPS_FILE = "clips.safetensors"
STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
FLOAT16_MAX = 65504.0


class BundleError(ValueError):
    """A bundle that cannot be written or loaded; the message names the file and the problem."""


# ------------------------------------------------------------------------------ where
def bundle_location() -> Path:
    """Where the bundled model is looked for: $WORLDSIM_BUNDLE_DIR, else inside the package."""
    override = os.environ.get(ENV_VAR)
    return Path(override).expanduser() if override else PACKAGE_BUNDLE_DIR


def is_bundle(path: str | os.PathLike) -> bool:
    """True for a folder holding a bundle manifest (a training checkpoint holds checkpoint.json)."""
    return (Path(path) / MANIFEST_FILE).is_file()


def bundled_model_dir() -> Path | None:
    """The installed bundle's folder, or None when there is none (the callers' clear error)."""
    where = bundle_location()
    return where if is_bundle(where) else None


# ------------------------------------------------------------------------------ reading
@dataclass
class Clips:
    """Real context clips: frames uint8 (N, T, H, W, 3), actions int64 (N, T - 1)."""

    frames: np.ndarray
    actions: np.ndarray

    def __post_init__(self) -> None:
        f, a = self.frames, self.actions
        if f.dtype != np.uint8 or f.ndim != 5 or f.shape[-1] != 3 or f.shape[1] < 1:
            raise BundleError(f"clip frames must be uint8 (N, T, H, W, 3), got {f.dtype} {f.shape}")
        if a.dtype.kind not in "iu" or a.shape != (f.shape[0], f.shape[1] - 1):
            raise BundleError(f"clip actions must be integers of shape {(f.shape[0], f.shape[1] - 1)} "
                              f"(N, T - 1), got {a.dtype} {a.shape}")
        if len(f) == 0:
            raise BundleError("a bundle needs at least one context clip")
        self.actions = a.astype(np.int64)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def clip_frames(self) -> int:
        return self.frames.shape[1]

    def context(self):
        """The clips as a `ContextSource` for `DreamEnv` (each reset starts from one of them)."""
        return ClipContext(list(self.frames), list(self.actions))


class Bundle(NamedTuple):
    model: Any
    """WorldModel, float32, eval mode."""
    codec: Any
    """FrameCodec, eval mode."""
    clips: Clips


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """model.json of a bundle, after format and version checks."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise BundleError(f"{path}: not a model bundle (no {MANIFEST_FILE})")
    manifest = read_format_json(file, FORMAT, VERSION, what="a model bundle", version_label="bundle", error=BundleError)
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise BundleError(f"{file}: corrupt manifest: no \"files\" table (file name -> sha256); "
                          "reinstall worldsim or rebuild the bundle")
    if not isinstance(manifest.get("model_config"), dict):
        raise BundleError(f"{file}: corrupt manifest: no \"model_config\" object; reinstall worldsim or rebuild the bundle")
    sigma = manifest.get("sigma_data")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise BundleError(f"{file}: corrupt manifest: \"sigma_data\" must be a number, got {sigma!r}")
    return manifest


def verify_files(path: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists and has its recorded sha256."""
    folder = Path(path)
    for name, digest in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise BundleError(f"{file}: missing from the bundle (reinstall worldsim or rebuild the bundle)")
        if sha256_file(file) != digest:
            raise BundleError(f"{file}: corrupt (sha256 differs from {folder / MANIFEST_FILE}); "
                              "reinstall worldsim or rebuild the bundle")


def _read_weights(folder: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    file = folder / WEIGHTS_FILE
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise BundleError(f"{file}: unreadable safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise BundleError(f"{file}: not bundle weights (format {meta.get('format')!r})")
    try:
        stored_config = json.loads(meta.get("config", "null"))
    except json.JSONDecodeError as e:
        raise BundleError(f"{file}: corrupt model config in its header ({e})") from None
    if stored_config != manifest["model_config"]:
        raise BundleError(f"{file} was written with another model config than {folder / MANIFEST_FILE} (a mixed bundle)")
    return tensors


def load_bundle_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                      verify: bool = True) -> tuple[Any, dict[str, Any]]:
    """(float32 WorldModel in eval mode, manifest) from a bundle folder."""
    folder = Path(path)
    manifest = read_manifest(folder)
    if verify:
        verify_files(folder, manifest)
    try:
        cfg = ModelConfig.from_dict(manifest["model_config"])
    except (TypeError, ValueError, KeyError) as e:
        raise BundleError(f"{folder / MANIFEST_FILE}: model config does not fit this code ({e})") from None
    model = WorldModel(cfg, sigma_data=float(manifest["sigma_data"]))
    tensors = _read_weights(folder, manifest)
    own = model.state_dict()
    problems = tensor_diff(own, tensors)
    if problems:
        raise BundleError(f"{folder / WEIGHTS_FILE}: weights do not fit the model: " + "; ".join(problems))
    # float16 on disk only halves the download: compute runs in the model's own dtype (float32).
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
    return model.to(device).eval(), manifest


def load_bundle_codec(path: str | os.PathLike, *, device: str | torch.device = "cpu"):
    try:
        return codec_ckpt.load_codec(path, device=device)
    except codec_ckpt.CheckpointError as e:
        raise BundleError(f"{path}: the bundle's codec does not load: {e}") from None


def load_bundle_clips(path: str | os.PathLike) -> Clips:
    file = Path(path) / CLIPS_FILE
    try:
        with safe_open(file, framework="numpy") as f:
            return Clips(frames=f.get_tensor("frames"), actions=f.get_tensor("actions"))
    except BundleError:
        raise
    except Exception as e:  # noqa: BLE001 - a missing key or a bad header
        raise BundleError(f"{file}: unreadable clips file ({type(e).__name__}: {e})") from None


def load_bundle(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Bundle:
    """(model, codec, clips) from a bundle folder, every file checked against its sha256."""
    model, _ = load_bundle_model(path, device=device)
    return Bundle(model, load_bundle_codec(path, device=device), load_bundle_clips(path))


def load_bundled(*, device: str | torch.device = "cpu") -> Bundle:
    """The installed bundle (see `bundle_location`); FileNotFoundError when none is installed."""
    folder = bundled_model_dir()
    if folder is None:
        raise FileNotFoundError(f"no bundled model at {bundle_location()} (set ${ENV_VAR} or build one "
                                "with scripts/bundle_model.py)")
    return load_bundle(folder, device=device)


def check_maze_size(path: str | os.PathLike, maze_size: int) -> None:
    """The bundle learned one maze size; dreaming another would be silently out of distribution."""
    trained = read_manifest(path).get("maze_size")
    if trained is not None and trained != maze_size:
        raise BundleError(f"the bundled model ({path}) learned {trained}x{trained} Memory Mazes, not "
                          f"{maze_size}x{maze_size}: pass a checkpoint trained on that size (--checkpoint / checkpoint=)")


# ------------------------------------------------------------------------------ writing
def _weights_bytes(model, dtype: str) -> bytes:
    if dtype not in STORE_DTYPES:
        raise BundleError(f"dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        if t.is_floating_point():
            if not torch.isfinite(t).all():
                raise BundleError(f"weight {name!r} holds NaN or inf: refusing to bundle a broken model")
            if dtype == "float16" and t.abs().max() > FLOAT16_MAX:
                raise BundleError(f"weight {name!r} exceeds the float16 range; bundle with --dtype float32")
            t = t.to(STORE_DTYPES[dtype])
        out[name] = t
    config = json.dumps(model.cfg.to_dict(), sort_keys=True)
    return safetensors_bytes(out, metadata={"format": FORMAT, "config": config, "dtype": dtype})


def write_bundle(
    out_dir: str | os.PathLike,
    *,
    model,
    codec,
    clips: Clips,
    dtype: str = "float16",
    maze_size: int | None = 9,
    provenance: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    clip_sources: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """Write a bundle into `out_dir`, atomically: built in a hidden folder beside it, then renamed
    over the old bundle, so a crash leaves the old bundle or the new one, never a mix."""
    out_dir = Path(out_dir)
    if clips.frames.shape[2:4] != (codec.config.image_size,) * 2:
        raise BundleError(f"clip frames are {clips.frames.shape[2:4]}, the codec takes "
                          f"{codec.config.image_size}x{codec.config.image_size}")
    if model.cfg.action_kind == "discrete" and (clips.actions.min() < 0 or clips.actions.max() >= model.cfg.n_actions):
        raise BundleError(f"clip actions must lie in [0, {model.cfg.n_actions}), got "
                          f"[{clips.actions.min()}, {clips.actions.max()}]")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        atomic_write_bytes(tmp / WEIGHTS_FILE, _weights_bytes(model, dtype))
        codec_ckpt.save_codec(codec, tmp)
        clip_tensors = {"frames": torch.from_numpy(np.ascontiguousarray(clips.frames)),
                        "actions": torch.from_numpy(np.ascontiguousarray(clips.actions))}
        atomic_write_bytes(tmp / CLIPS_FILE, safetensors_bytes(clip_tensors, metadata={"format": FORMAT}))
        files = [WEIGHTS_FILE, codec_ckpt.WEIGHTS_FILE, codec_ckpt.CONFIG_FILE, CLIPS_FILE]
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "model_config": model.cfg.to_dict(),
            "sigma_data": float(model.sigma_data),
            "stored_dtype": dtype,
            "maze_size": maze_size,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "provenance": {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           **(provenance or {})},
            "metrics": metrics or {},
            "clips": {"count": len(clips), "frames": clips.clip_frames, "sources": list(clip_sources or [])},
            "files": {name: sha256_file(tmp / name) for name in files},
        }
        atomic_write_json(tmp / MANIFEST_FILE, manifest)  # last: its presence marks a whole bundle
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def bundle_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


# ------------------------------------------------------------------------------ clips for a bundle
def sample_clips(dataset, count: int, clip_frames: int, seed: int = 0) -> tuple[Clips, list[dict[str, Any]]]:
    """`count` clips of `clip_frames` frames from a Minari dataset (id or path), from distinct
    episodes while there are enough, chosen by `seed`; plus where each came from."""
    # Here, not at the top: the GPU job reads and writes bundles on a machine without gymnasium.
    from worldsim.data.windows import WindowDataset

    if count < 1 or clip_frames < 2:
        raise BundleError(f"need count >= 1 and clip_frames >= 2, got {count} and {clip_frames}")
    windows = WindowDataset(dataset, clip_frames)
    order = np.random.default_rng(seed).permutation(len(windows))
    picked, episodes = [], set()
    for i in order:  # first pass: one clip per episode, so the clips show different mazes
        key = windows.locate(int(i))[:2]
        if key not in episodes:
            episodes.add(key)
            picked.append(int(i))
            if len(picked) == count:
                break
    picked += [int(i) for i in order if int(i) not in picked][: count - len(picked)]
    if len(picked) < count:
        raise BundleError(f"{dataset}: only {len(windows)} windows of {clip_frames} frames, {count} clips asked")
    frames, actions, sources = [], [], []
    for i in picked:
        item = windows[i]
        frames.append(item["frames"].numpy())
        actions.append(item["actions"].numpy()[: clip_frames - 1])  # the last action leads past the clip
        sources.append({"dataset": str(dataset), "source": int(item["source"]), "episode": int(item["episode"]),
                        "start": int(item["start"]), "seed": seed})
    windows.close()
    act = np.stack(actions)
    if act.dtype.kind not in "iu":
        raise BundleError(f"{dataset}: bundled clips need discrete (integer) actions, the dataset has {act.dtype}")
    return Clips(frames=np.stack(frames), actions=act), sources
