"""Which world model to load, and loading it: a world-model checkpoint or run folder, a bundle
folder, or the bundled default (checkpoint None or "bundled"), each with its codec.

Evaluation, the viewer, the commands, agents and the dream envs all load models through here, so
none of them needs a Gymnasium env to get a model.
"""

from __future__ import annotations

import torch

from worldsim.bundled import bundle_location, bundled_model_dir, check_maze_size, is_bundle, load_bundle_codec, load_bundle_model
from worldsim.codec.autoencoder import CodecConfig
from worldsim.codec.checkpoint import load_codec
from worldsim.train.checkpoint import CheckpointError, load_world_model

BUNDLED = "bundled"  # checkpoint="bundled": the shipped bundle, as checkpoint=None


def load_dream_model(checkpoint, codec=None, device: str | torch.device = "cpu"):
    """(world model with its EMA weights, its codec) from a world-model checkpoint (or run) folder,
    or from a model bundle folder (`worldsim.bundled`).

    The codec defaults to the one recorded in the checkpoint; any codec given must have the config
    the model was trained with. Config mismatches raise `CheckpointError` naming the keys.
    """
    if checkpoint is None or _is_bundled_keyword(checkpoint):
        checkpoint = default_checkpoint(None)
    if is_bundle(checkpoint):  # the bundled default model (or another bundle folder)
        model, _ = load_bundle_model(checkpoint, device=device)
        bundle_codec = load_bundle_codec(checkpoint, device=device)
        if codec is None:
            return model, bundle_codec
        return model, load_codec(codec, expect=bundle_codec.config, device=device)
    model, sidecar = load_world_model(checkpoint, device=device)
    recorded = sidecar.get("codec") or {}
    path = codec if codec is not None else recorded.get("path")
    if path is None:
        raise CheckpointError(f"{checkpoint}: records no codec; pass codec=<codec checkpoint folder>")
    expect = CodecConfig.from_dict(recorded["config"]) if "config" in recorded else None
    return model, load_codec(path, expect=expect, device=device)


NO_MODEL_HELP = (
    "the dream envs need a trained world model: pass checkpoint=<world-model checkpoint or run folder> "
    "(and optionally codec=<codec checkpoint>), e.g. gymnasium.make('{id}', checkpoint='runs/wm'). "
    "Train one with `worldsim train-codec` then `worldsim train`. No bundled default model is installed."
)


def default_checkpoint(maze_size: int | None):
    """The bundled model's folder, used when no checkpoint is given; ValueError when none is
    installed or when it learned another maze size (None: any size)."""
    found = bundled_model_dir()
    if found is None:
        size = maze_size or 9
        help_text = NO_MODEL_HELP.format(id=f"worldsim/Dream-MemoryMaze-{size}x{size}-v0")
        raise ValueError(f"{help_text} (looked in {bundle_location()})")
    if maze_size is not None:
        check_maze_size(found, maze_size)
    return found


def _is_bundled_keyword(checkpoint) -> bool:
    return isinstance(checkpoint, str) and checkpoint == BUNDLED


def resolve_dream_checkpoint(checkpoint, maze_size: int | None):
    """`checkpoint` as given, or the bundled model's folder for None / "bundled" (checked against
    the maze size the dream's live context uses)."""
    if checkpoint is None or _is_bundled_keyword(checkpoint):
        return default_checkpoint(maze_size)
    return checkpoint
