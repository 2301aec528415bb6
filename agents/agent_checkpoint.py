"""Agent checkpoints without pickles: SB3 policy weights as safetensors, everything else as JSON.

SB3's own `model.save` writes torch pickles inside a zip plus cloudpickled objects, so loading a
downloaded agent could run code. This format stores only tensors and plain data. Run folder:

    runs/<agent>/latest.json                    {"step": N, "num_timesteps": N, "checkpoint": "checkpoints/step_00000N"}
    runs/<agent>/checkpoints/step_00000N/
        agent.json              format, version, algorithm, policy class name, policy_kwargs,
                                hyper-parameters, observation and action spaces, num_timesteps,
                                the world it was trained in, eval history, optimizer layout
        policy.safetensors      the policy's state_dict
        optimizer.safetensors   the optimizer's moments (resume); its hyper-parameters are in agent.json
    runs/<agent>/tb/            SB3's scalars and the real-maze evaluations

Atomicity as every checkpoint format (`worldsim.utils.checkpoint_folders`): a hidden temporary folder
renamed into place, then latest.json replaced atomically. Both safetensors files carry
num_timesteps in their header, so a folder mixing files of two checkpoints is refused; agent.json
records each file's sha256 as written, so a corrupt file is refused naming it (older checkpoints
without hashes load unchecked).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from worldsim.train.checkpoint import SHA256_KEY, optimizer_from_storage, optimizer_to_storage
from worldsim.utils.atomic import atomic_write_bytes, check_sha256
from worldsim.utils.checkpoint_folders import (
    CheckpointError, commit_checkpoint, latest_checkpoint, resolve_checkpoint_folder, temp_folder,
)
from worldsim.utils.format_json import read_format_json
from worldsim.utils.safetensors_io import open_safetensors, safetensors_bytes, tensor_diff

FORMAT = "worldsim-agent"
VERSION = 1
AGENT_FILE = "agent.json"
POLICY_FILE = "policy.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


# ------------------------------------------------------------------------------ spaces
def space_summary(space: gym.Space) -> dict[str, Any]:
    """A JSON description of a Box or Discrete space, enough to compare spaces and rebuild them."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.Box):
        # Bounds are summarised by their extremes: image spaces are uniform (0..255) and an MLP
        # policy does not read them; a full per-pixel array would bloat the JSON for nothing.
        return {"type": "Box", "shape": list(space.shape), "dtype": str(space.dtype),
                "low": float(np.min(space.low)), "high": float(np.max(space.high))}
    raise ValueError(f"agent checkpoints store Box and Discrete spaces, not {space}")


def space_from_summary(summary: dict[str, Any]) -> gym.Space:
    if summary["type"] == "Discrete":
        return gym.spaces.Discrete(summary["n"], start=summary.get("start", 0))
    if summary["type"] == "Box":
        dtype = np.dtype(summary["dtype"])
        low, high = summary["low"], summary["high"]
        if dtype.kind in "iu":
            low, high = int(low), int(high)
        return gym.spaces.Box(low, high, tuple(summary["shape"]), dtype)
    raise ValueError(f"unknown space type {summary['type']!r} in an agent checkpoint")


def check_spaces(meta: dict[str, Any], observation_space: gym.Space, action_space: gym.Space, where: str) -> None:
    """ValueError naming both sides when the env's spaces are not those the agent was trained on."""
    saved = (meta["observation_space"], meta["action_space"])
    if saved != (space_summary(observation_space), space_summary(action_space)):
        trained = f"{space_from_summary(saved[0])} -> {space_from_summary(saved[1])}"
        raise ValueError(f"{where}: the agent was trained on observation space / action space {trained}, "
                         f"the env has {observation_space} -> {action_space}")


# ------------------------------------------------------------------------------ save
def _tensors_bytes(tensors: dict[str, torch.Tensor], num_timesteps: int) -> bytes:
    # clone(): PPO's shared feature extractor appears under three names, and safetensors refuses
    # tensors that share storage.
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return safetensors_bytes(clean, metadata={"format": FORMAT, "num_timesteps": str(num_timesteps)})


def save_agent(run_dir: str | os.PathLike, *, policy: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
               meta: dict[str, Any], num_timesteps: int) -> Path:
    """Write checkpoint `num_timesteps` of an agent into `run_dir/checkpoints/`, then point
    latest.json at it. `meta` (JSON-able) must hold the algorithm, policy and spaces."""
    sidecar = {"format": FORMAT, "version": VERSION, **meta, "num_timesteps": int(num_timesteps), "optimizer": None}
    optim_tensors: dict[str, torch.Tensor] = {}
    if optimizer is not None:
        names = {id(p): n for n, p in policy.named_parameters()}
        optim_tensors, optim_meta = optimizer_to_storage(optimizer, names)
        sidecar["optimizer"] = {"class": type(optimizer).__name__, **optim_meta}
    try:
        sidecar_bytes = json.dumps(sidecar, indent=2).encode()
    except TypeError as e:
        raise TypeError(f"agent.json is not JSON-serialisable: {e}") from None

    hashes: dict[str, str] = {}
    tmp = temp_folder(run_dir, num_timesteps)

    def write(name: str, data: bytes) -> None:
        hashes[name] = hashlib.sha256(data).hexdigest()
        atomic_write_bytes(tmp / name, data)

    write(POLICY_FILE, _tensors_bytes(policy.state_dict(), num_timesteps))
    if optimizer is not None:
        write(OPTIMIZER_FILE, _tensors_bytes(optim_tensors, num_timesteps))
    # The hashes, checked on load, catch a corrupt file (a flipped byte in weights loads silently).
    sidecar_bytes = json.dumps({**sidecar, SHA256_KEY: hashes}, indent=2).encode()
    atomic_write_bytes(tmp / AGENT_FILE, sidecar_bytes)  # last: its presence marks a full folder

    return commit_checkpoint(run_dir, tmp, int(num_timesteps), pointer={"num_timesteps": int(num_timesteps)})


# ------------------------------------------------------------------------------ load
def agent_checkpoint_problem(folder: Path) -> str | None:
    """Why an agent checkpoint folder cannot be loaded (agent.json or a safetensors header unreadable,
    files of another step), or None. Reads headers only."""
    try:
        meta = read_format_json(folder / AGENT_FILE, FORMAT, VERSION, what="an agent checkpoint",
                                version_label="agent", error=CheckpointError)
        step = str(int(meta["num_timesteps"]))
        for name in (POLICY_FILE, OPTIMIZER_FILE):
            if (folder / name).is_file():
                with open_safetensors(folder / name, error=CheckpointError) as f:
                    if (f.metadata() or {}).get("num_timesteps") != step:
                        return f"{folder / name}: belongs to another step than {folder / AGENT_FILE}"
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        return str(e)
    return None


def latest_agent(run_dir: str | os.PathLike) -> Path | None:
    """A run's newest agent checkpoint: the same latest.json pointer as world-model runs, with the
    same fallback to the newest usable checkpoint (and a warning) when that one is corrupt."""
    return latest_checkpoint(run_dir, problem_of=agent_checkpoint_problem, marker=AGENT_FILE)


def resolve_agent(path: str | os.PathLike) -> Path:
    """An agent checkpoint folder from itself or from a run folder holding latest.json."""
    return resolve_checkpoint_folder(path, marker=AGENT_FILE, what="an agent checkpoint", latest=latest_agent,
                                     hint="; train one with `worldsim agent train`")


def read_agent_meta(path: str | os.PathLike) -> dict[str, Any]:
    """agent.json of a checkpoint (or of a run's latest), after format and version checks."""
    return read_format_json(resolve_agent(path) / AGENT_FILE, FORMAT, VERSION, what="an agent checkpoint",
                            version_label="agent", error=CheckpointError)


def _read_tensors(file: Path, num_timesteps: int, agent_meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    # A truncated or non-safetensors file (e.g. a pickled torch.save) fails naming the file.
    with open_safetensors(file, error=CheckpointError) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{file}: not an agent checkpoint file (format {meta.get('format')!r})")
        if meta.get("num_timesteps") != str(num_timesteps):
            raise CheckpointError(f"{file} belongs to step {meta.get('num_timesteps')}, but {AGENT_FILE} beside it "
                                  f"is step {num_timesteps}: a torn or mixed checkpoint folder")
        hashes = (agent_meta or {}).get(SHA256_KEY)
        check_sha256(file, hashes.get(file.name) if isinstance(hashes, dict) else None, CheckpointError)
        return {k: f.get_tensor(k) for k in f.keys()}


def load_policy_weights(folder: str | os.PathLike, policy: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Strictly load policy.safetensors into `policy` (missing / unexpected / mis-shaped keys named)."""
    file = Path(folder) / POLICY_FILE
    tensors = _read_tensors(file, int(meta["num_timesteps"]), meta)
    problems = tensor_diff(dict(policy.state_dict()), tensors)
    if problems:
        raise CheckpointError(f"{file}: the weights do not fit the {meta['policy']} of {meta['algorithm']}: "
                              + "; ".join(problems))
    policy.load_state_dict(tensors)


def load_optimizer_state(folder: str | os.PathLike, policy: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         meta: dict[str, Any]) -> bool:
    """Restore the optimizer's moments; False when the checkpoint holds none."""
    saved = meta.get("optimizer")
    if saved is None:
        return False
    folder = Path(folder)
    if saved["class"] != type(optimizer).__name__:
        raise CheckpointError(f"{folder}: optimizer is {saved['class']} in the checkpoint, {type(optimizer).__name__} in the code")
    tensors = _read_tensors(folder / OPTIMIZER_FILE, int(meta["num_timesteps"]), meta)
    names = {id(p): n for n, p in policy.named_parameters()}
    optimizer_from_storage(optimizer, names, tensors, saved, folder)
    return True
