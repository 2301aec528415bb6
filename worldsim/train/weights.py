"""Weight helpers shared by the trainer (`trainer`) and the GPU job (`gpu_job`): AdamW parameter
groups and warm starts. Imports nothing beyond torch and worldsim's
model and checkpoint code, so the GPU job (no gymnasium there) can use them.
"""

from __future__ import annotations

from typing import Any

import torch

from worldsim import bundled
from worldsim.train import checkpoint as ckpt
from worldsim.train.checkpoint import CheckpointError

# Config fields a warm start may change: they add zero-initialised layers or choose kernels, so
# the loaded weights still compute what they computed.
WARM_START_FREE_FIELDS = ("prev_frames", "local_head", "attn_backend", "ssm_backend", "ssm_chunk_size")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices only. 1-D tensors (biases, norm gains, per-channel scales) and
    parameters flagged `_no_weight_decay` (embeddings, positions, SSM A_log / D) are not pulled
    towards zero: it would change what they mean, not just their size."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_source_model(source: str):
    """The WorldModel of a bundle or a checkpoint / run folder (EMA weights), float32 on the CPU."""
    if bundled.is_bundle(source):
        model, _ = bundled.load_bundle_model(source)
    else:
        model, _ = ckpt.load_world_model(source, weights="ema")
    return model


def copy_weights(model, loaded, source: str = "the source") -> dict[str, Any]:
    """Copy every tensor of `loaded` (a WorldModel) into `model`; their configs may differ only in
    WARM_START_FREE_FIELDS, and tensors only `model` has keep their initialisation. A
    CheckpointError names any other difference. Returns {"copied": n, "new": [names]}."""
    mine, theirs = model.cfg.to_dict(), loaded.cfg.to_dict()
    differ = [f"{k}: {theirs[k]!r} there, {mine[k]!r} here" for k in mine
              if k not in WARM_START_FREE_FIELDS and mine[k] != theirs[k]]
    if differ:
        raise CheckpointError(f"cannot warm start from {source}: its model config differs: " + "; ".join(differ))
    own, found = model.state_dict(), loaded.state_dict()
    bad = [k for k in found if k not in own or own[k].shape != found[k].shape]
    if bad:
        raise CheckpointError(f"cannot warm start from {source}: tensors that do not fit this model: {bad[:5]}")
    with torch.no_grad():
        for k, v in found.items():
            own[k].copy_(v.to(own[k]))
    return {"copied": len(found), "new": sorted(k for k in own if k not in found)}


def warm_start(model, source: str) -> dict[str, Any]:
    """Copy the EMA weights of `source` (bundle, checkpoint or run folder) into `model` (`copy_weights`)."""
    return copy_weights(model, load_source_model(source), source)
