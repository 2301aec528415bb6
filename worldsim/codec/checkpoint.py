"""Codec checkpoints: `codec.safetensors` (weights + latent stats) beside `codec.json` (config).

No pickle anywhere, so loading a downloaded checkpoint cannot run code. Each file is written
atomically; the config is also copied into the safetensors header, so a weights file paired with
the JSON of another checkpoint (a torn copy) is detected on load instead of silently mis-loaded.

`load_codec(path)` takes a checkpoint folder, or a training run folder (it follows the run's
`latest.json` to the newest checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from worldsim.codec.autoencoder import CodecConfig, FrameCodec
from worldsim.utils.atomic import atomic_write_bytes, atomic_write_json, check_sha256
from worldsim.utils.checkpoint_folders import CheckpointError, resolve_checkpoint_folder
from worldsim.utils.format_json import read_format_json, read_json_object
from worldsim.utils.safetensors_io import open_safetensors, safetensors_bytes

FORMAT = "worldsim-codec"
VERSION = 1
WEIGHTS_FILE = "codec.safetensors"
CONFIG_FILE = "codec.json"
SHA256_KEY = "sha256"  # codec.json: {"codec.safetensors": hex sha256 as written}; older checkpoints lack it


def config_mismatch(expected: CodecConfig, found: CodecConfig) -> list[str]:
    """'field: expected X, checkpoint has Y' for every differing field."""
    a, b = expected.to_dict(), found.to_dict()
    return [f"{k}: expected {a[k]!r}, checkpoint has {b[k]!r}" for k in a if a[k] != b[k]]


def save_codec(
    codec: FrameCodec, directory: str | os.PathLike, *, extra: dict | None = None
) -> Path:
    """Write `codec.safetensors` and `codec.json` into `directory`; returns the folder."""
    directory = Path(directory)
    config = codec.config.to_dict()
    header = {"format": FORMAT, "version": VERSION, "config": config, **(extra or {})}
    # contiguous() + clone: safetensors refuses views that share storage.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in codec.state_dict().items()}
    meta = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(config, sort_keys=True)}
    data = safetensors_bytes(tensors, metadata=meta)
    atomic_write_bytes(directory / WEIGHTS_FILE, data)
    # Checked on load: a flipped byte in the weights would otherwise load without a word.
    header[SHA256_KEY] = {WEIGHTS_FILE: hashlib.sha256(data).hexdigest()}
    atomic_write_json(directory / CONFIG_FILE, header)
    return directory


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder or a run folder holding `latest.json`."""
    return resolve_checkpoint_folder(path, marker=CONFIG_FILE, what="a codec checkpoint")


def read_config(path: str | os.PathLike) -> CodecConfig:
    """The codec config of a checkpoint, after checking its format and version."""
    folder = resolve_checkpoint(path)
    header = read_format_json(folder / CONFIG_FILE, FORMAT, VERSION, what="a codec checkpoint",
                              version_label="checkpoint", error=CheckpointError)
    try:
        return CodecConfig.from_dict(header["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: invalid codec config ({e})") from None


def _recorded_sha256(folder: Path) -> str | None:
    """The sha256 codec.json recorded for the weights when they were written; None for older checkpoints."""
    header = read_json_object(folder / CONFIG_FILE, error=CheckpointError)
    hashes = header.get(SHA256_KEY)
    return hashes.get(WEIGHTS_FILE) if isinstance(hashes, dict) else None


def _read_weights(folder: Path, config: CodecConfig) -> dict[str, torch.Tensor]:
    file = folder / WEIGHTS_FILE
    # A truncated or non-safetensors file (e.g. a pickled torch.save) fails naming the file.
    with open_safetensors(file, error=CheckpointError) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{file}: not codec weights (format {meta.get('format')!r})")
        try:
            stored = CodecConfig.from_dict(json.loads(meta["config"]))
        except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{file}: no readable codec config in its header ({e})") from None
        if stored != config:
            raise CheckpointError(
                f"{file} was saved with a different config than {folder / CONFIG_FILE} (a torn or "
                f"mixed checkpoint): " + "; ".join(config_mismatch(config, stored))
            )
        if "stored_dtype" not in meta:  # a copy re-stored in another dtype on purpose has other bytes
            check_sha256(file, _recorded_sha256(folder), CheckpointError)
        return {k: f.get_tensor(k) for k in f.keys()}


def load_codec_into(codec: FrameCodec, path: str | os.PathLike) -> None:
    """Load a checkpoint's weights into an existing codec; its config must match exactly."""
    folder = resolve_checkpoint(path)
    found = read_config(folder)
    if found != codec.config:
        raise CheckpointError(
            f"{folder}: codec config mismatch: " + "; ".join(config_mismatch(codec.config, found))
        )
    tensors = _read_weights(folder, found)
    own = codec.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / WEIGHTS_FILE}: missing tensors {missing}, unexpected tensors {unexpected}"
        )
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if tensors[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: shapes differ from the model: {wrong}")
    codec.load_state_dict(tensors)


def load_codec(
    path: str | os.PathLike,
    *,
    expect: CodecConfig | None = None,
    device: str | torch.device = "cpu",
) -> FrameCodec:
    """Build a codec from a checkpoint (or a run's latest), in eval mode.

    With `expect`, the checkpoint's config must equal it (e.g. the codec a world model was trained
    with); otherwise the error lists every differing field.
    """
    config = read_config(path)
    if expect is not None and expect != config:
        diff = "; ".join(config_mismatch(expect, config))
        raise CheckpointError(f"{resolve_checkpoint(path)}: codec config mismatch: {diff}")
    codec = FrameCodec(config)
    load_codec_into(codec, path)
    return codec.to(device).eval()


# ------------------------------------------------------------------------------ identity
def codec_fingerprint(codec: torch.nn.Module) -> str:
    """sha256 of what defines the codec's latent space: the encoder's tensors and the latent stats.

    The decoder is left out on purpose: fine-tuning it (`worldsim train-codec --decoder-only`)
    changes how latents look as frames, not what they are, so the world models, runs and latent
    caches built on the codec stay valid with the sharper decoder."""
    return _tensors_sha256(codec, skip_prefix="decoder.")


def full_codec_fingerprint(codec: torch.nn.Module) -> str:
    """sha256 of every codec tensor: what runs written before 2026-11-26 recorded as the codec."""
    return _tensors_sha256(codec)


def _tensors_sha256(codec: torch.nn.Module, skip_prefix: str | None = None) -> str:
    """sha256 over the names and bytes of the state_dict's tensors, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(codec.state_dict().items()):
        if skip_prefix is not None and name.startswith(skip_prefix):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def codec_matches(recorded_sha: str | None, codec: torch.nn.Module, recorded_path: str | None = None) -> bool:
    """True when `codec` encodes as the codec a run recorded (sha None: nothing recorded).

    Runs written before 2026-11-26 recorded `full_codec_fingerprint`, which a decoder fine-tune
    changes; for them the codec still at `recorded_path` (when its weights are the recorded ones)
    tells whether `codec` has the same encoder and latent stats."""
    if recorded_sha is None or recorded_sha in (codec_fingerprint(codec), full_codec_fingerprint(codec)):
        return True
    if recorded_path is None:
        return False
    try:
        original = load_codec(recorded_path)
    except (CheckpointError, FileNotFoundError):
        return False
    return full_codec_fingerprint(original) == recorded_sha and codec_fingerprint(original) == codec_fingerprint(codec)
