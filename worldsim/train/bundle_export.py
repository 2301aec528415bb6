"""A training run's checkpoint -> the bundle users dream with (`worldsim.bundled` holds the format).

    python scripts/bundle_model.py --checkpoint runs/mm9 --dataset worldsim/mm9-train-v1

Lives with training, above the bundle format: it reads training checkpoints, which the bundle
format itself (loaded by every dream) never needs to know about.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from worldsim import bundled
from worldsim.codec import checkpoint as codec_ckpt
from worldsim.codec.autoencoder import CodecConfig
from worldsim.train.checkpoint import load_world_model, resolve_checkpoint


def bundle_from_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dataset,
    codec: str | os.PathLike | None = None,
    clips: int = 4,
    clip_frames: int = 9,
    weights: str = "ema",
    dtype: str = "float16",
    maze_size: int | None = 9,
    metrics: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """A training checkpoint (or run folder) + context clips from `dataset` -> a bundle in `out_dir`.

    The codec defaults to the one the checkpoint records; whichever is used must have the config
    and (when recorded) the exact weights the model was trained with.
    """
    folder = resolve_checkpoint(checkpoint)
    model, sidecar = load_world_model(folder, weights=weights)
    recorded = sidecar.get("codec") or {}
    codec_path = codec if codec is not None else recorded.get("path")
    if codec_path is None:
        raise bundled.BundleError(f"{folder}: records no codec; pass --codec <codec checkpoint>")
    expect = CodecConfig.from_dict(recorded["config"]) if "config" in recorded else None
    codec_model = codec_ckpt.load_codec(codec_path, expect=expect)
    sha = codec_ckpt.codec_fingerprint(codec_model)
    if not codec_ckpt.codec_matches(recorded.get("sha256"), codec_model, recorded.get("path")):
        raise bundled.BundleError(f"{codec_path}: not the codec {folder} was trained with (its encoder differs from "
                          f"{recorded.get('path')}); pass the right --codec")
    clip_set, sources = bundled.sample_clips(dataset, clips, clip_frames, seed)
    train = sidecar.get("train_config") or {}
    provenance = {
        "source_checkpoint": str(folder.resolve()), "step": int(sidecar["step"]), "weights": weights,
        "ema_updates": (sidecar.get("ema") or {}).get("num_updates"), "training_datasets": train.get("datasets"),
        "preset": train.get("preset"), "variant": train.get("variant"), "window": train.get("window"),
        "last_loss": sidecar.get("last_loss"), "clip_dataset": str(dataset), "codec_sha256": sha,
    }
    return bundled.write_bundle(out_dir, model=model, codec=codec_model, clips=clip_set, dtype=dtype, maze_size=maze_size,
                        provenance=provenance, metrics=metrics, clip_sources=sources)
