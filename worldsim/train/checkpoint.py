"""Training checkpoints: weights, EMA, optimizer, LR schedule, step, data position and RNG states.

No pickle anywhere (a downloaded checkpoint cannot run code): tensors go to safetensors, the rest
to one JSON sidecar. Run folder layout:

    runs/<name>/latest.json                   {"step": N, "checkpoint": "checkpoints/step_00000N"}
    runs/<name>/checkpoints/step_00000N/
        checkpoint.json      format, version, step, model config, optimizer hyper-parameters and
                             parameter names, scheduler state, RNG states (small parts), whatever
                             the trainer adds (train config, data position, codec, metrics),
                             and the sha256 of each safetensors file as written (checked on load)
        model.safetensors    training weights
        ema.safetensors      EMA weights (what sampling and the dream envs should load)
        trainer.safetensors  optimizer moments and the large RNG states (torch, CUDA, numpy)

Atomicity: a checkpoint is written into a hidden temporary folder, renamed into place, then
latest.json is replaced atomically. A kill at any moment leaves latest.json pointing at a complete
checkpoint. Every safetensors file also carries the step in its header, so a folder mixing files of
two checkpoints (a torn copy by hand) is refused instead of silently mis-loaded.

Loading is strict: a model config that differs from the code's, missing, unexpected or mis-shaped
tensors, or optimizer parameters that do not line up all fail with a message naming the keys.
A file whose bytes differ from the sha256 recorded at write time (a flipped bit on disk or in a
copy) fails naming the file; checkpoints written before hashes were recorded load unchecked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from worldsim.model.config import ModelConfig
from worldsim.model.world_model import WorldModel
from worldsim.train.ema import EMA
from worldsim.utils import checkpoint_folders as folders
from worldsim.utils.atomic import atomic_write_bytes, check_sha256
from worldsim.utils.checkpoint_folders import (  # noqa: F401 (re-exported: the run-folder API of this format)
    CHECKPOINTS_DIR,
    LATEST_FILE,
    CheckpointError,
    checkpoint_name,
    read_latest_pointer,
)
from worldsim.utils.format_json import read_format_json
from worldsim.utils.safetensors_io import open_safetensors, safetensors_bytes, tensor_diff  # noqa: F401 (tensor_diff re-exported)

FORMAT = "worldsim-world-model"
VERSION = 1
SIDECAR_FILE = "checkpoint.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
TRAINER_FILE = "trainer.safetensors"
SHA256_KEY = "sha256"  # sidecar: {file name: hex sha256 of its bytes as written}; older checkpoints lack it

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ comparisons
def config_diff(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """'key: code has X, checkpoint has Y' for every key whose value differs or is on one side only."""
    missing = object()
    out = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key, missing), found.get(key, missing)
        # JSON turns tuples into lists; compare through a JSON round trip so (1, 2) == [1, 2].
        if a is missing or b is missing or _jsonable(a) != _jsonable(b):
            show = lambda v: "<absent>" if v is missing else repr(v)  # noqa: E731
            out.append(f"{key}: code has {show(a)}, checkpoint has {show(b)}")
    return out


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


# ------------------------------------------------------------------------------ RNG states
def capture_rng_state() -> dict[str, Any]:
    """The global RNGs of this process: Python, NumPy (legacy global), torch CPU and CUDA."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    cuda = state["torch_cuda"]
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            # A different GPU count: the states cannot map one to one; keep the fresh ones.
            return
        torch.cuda.set_rng_state_all(cuda)


def _rng_to_storage(states: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Per-rank RNG states -> (tensors for safetensors, JSON-able small parts)."""
    tensors, meta = {}, []
    for rank, s in enumerate(states):
        version, mt, gauss = s["python"]
        kind, keys, pos, has_gauss, cached = s["numpy"]
        tensors[f"rng.{rank}.torch_cpu"] = s["torch_cpu"].contiguous()
        for i, cuda in enumerate(s["torch_cuda"]):
            tensors[f"rng.{rank}.torch_cuda.{i}"] = cuda.cpu().contiguous()
        tensors[f"rng.{rank}.numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
        tensors[f"rng.{rank}.python_mt"] = torch.tensor(mt, dtype=torch.int64)
        meta.append({
            "python": [version, gauss],
            "numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "cuda_devices": len(s["torch_cuda"]),
        })  # fmt: skip
    return tensors, meta


def _rng_from_storage(tensors: dict[str, torch.Tensor], meta: list[dict]) -> list[dict[str, Any]]:
    states = []
    for rank, m in enumerate(meta):
        version, gauss = m["python"]
        mt = tuple(tensors[f"rng.{rank}.python_mt"].tolist())
        kind, pos, has_gauss, cached = m["numpy"]
        keys = tensors[f"rng.{rank}.numpy_keys"].numpy().astype(np.uint32)
        states.append({
            "python": (version, mt, gauss),
            "numpy": (kind, keys, pos, has_gauss, cached),
            "torch_cpu": tensors[f"rng.{rank}.torch_cpu"],
            "torch_cuda": [tensors[f"rng.{rank}.torch_cuda.{i}"] for i in range(m["cuda_devices"])],
        })  # fmt: skip
    return states


# --------------------------------------------------------------------------- optimizer state
def optimizer_to_storage(
    optimizer: torch.optim.Optimizer, names: dict[int, str]
) -> tuple[dict[str, torch.Tensor], dict]:
    """Moments as tensors `optim.<index>.<name>`; hyper-parameters and parameter names to JSON.

    `names` maps id(parameter) -> its name in the model, stored so a reload can check that the
    i-th parameter of the optimizer is still the same parameter.
    """
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    group_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "param_names": group_names}


def optimizer_from_storage(
    optimizer: torch.optim.Optimizer,
    names: dict[int, str],
    tensors: dict[str, torch.Tensor],
    meta: dict,
    where: Path,
) -> None:
    code_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if code_names != meta["param_names"]:
        saved = meta["param_names"]
        lines = []
        if len(saved) != len(code_names):
            lines.append(f"{len(code_names)} parameter groups in the code, {len(saved)} in the checkpoint")
        for i, (a, b) in enumerate(zip(code_names, saved)):
            only_code, only_ckpt = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            if only_code or only_ckpt:
                lines.append(f"group {i}: only in code {only_code}, only in checkpoint {only_ckpt}")
            elif a != b:
                lines.append(f"group {i}: same parameters in a different order")
        raise CheckpointError(f"{where}: optimizer parameters do not match the model: " + "; ".join(lines))

    params = [p for g in optimizer.param_groups for p in g["params"]]
    flat_names = [n for g in code_names for n in g]
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["scalars"].items()}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        _, index, name = key.split(".", 2)
        index = int(index)
        if value.dim() > 0 and value.shape != params[index].shape:
            raise CheckpointError(
                f"{where}: optimizer state {name!r} of {flat_names[index]!r} has shape "
                f"{tuple(value.shape)}, the parameter {tuple(params[index].shape)}"
            )
        state.setdefault(index, {})[name] = value
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:
        if "betas" in g:  # JSON made the tuple a list
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------------ tensor files
def _tensors_bytes(tensors: dict[str, torch.Tensor], step: int, **meta: str) -> bytes:
    # clone(): safetensors refuses tensors sharing storage (tied weights, views).
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return safetensors_bytes(clean, metadata={"format": FORMAT, "step": str(step), **meta})


def _recorded_sha256(sidecar: dict[str, Any], name: str) -> str | None:
    """The sha256 the sidecar recorded for file `name` at write time; None for older checkpoints."""
    hashes = sidecar.get(SHA256_KEY)
    return hashes.get(name) if isinstance(hashes, dict) else None


def _read_tensors(file: Path, step: int, sha256: str | None = None) -> dict[str, torch.Tensor]:
    # A truncated or non-safetensors file (e.g. a pickled torch.save) fails naming the file.
    with open_safetensors(file, error=CheckpointError) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{file}: not a world-model checkpoint file (format {meta.get('format')!r})")
        if meta.get("step") != str(step):
            raise CheckpointError(
                f"{file} belongs to step {meta.get('step')}, but {file.parent / SIDECAR_FILE} is "
                f"step {step}: a torn or mixed checkpoint folder"
            )
        # Flipped bytes inside the tensor data load silently: the hash catches them. A copy
        # re-stored in another dtype on purpose (gpu_job's float16 export keeps the sidecar and
        # marks the header "stored_dtype") no longer has the recorded bytes, so it is not checked.
        if "stored_dtype" not in meta:
            check_sha256(file, sha256, CheckpointError)
        return {k: f.get_tensor(k) for k in f.keys()}


def _state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict())


def _load_module(module: nn.Module, file: Path, step: int, what: str, sha256: str | None = None) -> None:
    tensors = _read_tensors(file, step, sha256)
    problems = tensor_diff(_state_dict(module), tensors)
    if problems:
        raise CheckpointError(f"{file}: {what} do not fit the model: " + "; ".join(problems))
    module.load_state_dict(tensors)


# ------------------------------------------------------------------------------------- save
def save_checkpoint(
    run_dir: str | os.PathLike,
    *,
    step: int,
    model: nn.Module,
    model_config: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: EMA | None = None,
    rng_states: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write checkpoint `step` into `run_dir/checkpoints/` and point latest.json at it.

    `model` is the bare module (not DDP- or compile-wrapped: their parameter names differ).
    `rng_states`: one `capture_rng_state()` per rank (default: this process). `extra` must be
    JSON-able. `keep`: delete all but the newest `keep` checkpoints afterwards.
    """
    tmp = folders.temp_folder(run_dir, step)
    names = {id(p): n for n, p in model.named_parameters()}
    optim_tensors, optim_meta = optimizer_to_storage(optimizer, names)
    rng_tensors, rng_meta = _rng_to_storage(rng_states or [capture_rng_state()])
    sidecar = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "model_config": model_config,
        "ema": None if ema is None else {"decay": ema.decay, "num_updates": ema.num_updates},
        "optimizer": {"class": type(optimizer).__name__, **optim_meta},
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": rng_meta,
        **(extra or {}),
    }
    try:
        sidecar_bytes = json.dumps(sidecar, indent=2).encode()
    except TypeError as e:
        raise TypeError(f"checkpoint sidecar is not JSON-serialisable: {e}") from None

    config_json = json.dumps(model_config, sort_keys=True)
    hashes: dict[str, str] = {}

    def write(name: str, data: bytes) -> None:  # one file's bytes in memory at a time
        hashes[name] = hashlib.sha256(data).hexdigest()
        atomic_write_bytes(tmp / name, data)

    write(MODEL_FILE, _tensors_bytes(_state_dict(model), step, config=config_json))
    if ema is not None:
        write(EMA_FILE, _tensors_bytes(ema.state_dict(), step, config=config_json))
    write(TRAINER_FILE, _tensors_bytes({**optim_tensors, **rng_tensors}, step))
    # The hashes let the loaders tell a corrupt file from a good one (a flipped byte in the
    # weights loads without a word otherwise).
    sidecar_bytes = json.dumps({**sidecar, SHA256_KEY: hashes}, indent=2).encode()
    atomic_write_bytes(tmp / SIDECAR_FILE, sidecar_bytes)  # last: its presence marks a full folder

    return folders.commit_checkpoint(run_dir, tmp, step, keep=keep, marker=SIDECAR_FILE)


def list_checkpoints(run_dir: str | os.PathLike, marker: str = SIDECAR_FILE) -> list[Path]:
    """Complete checkpoint folders of a run (those holding `marker`), oldest first."""
    return folders.list_checkpoints(run_dir, marker)


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints; never the one latest.json points at."""
    folders.prune_checkpoints(run_dir, keep, SIDECAR_FILE)


# ------------------------------------------------------------------------------------- load
def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be loaded (sidecar or a safetensors header unreadable, files of
    another step), or None. Reads headers only; files a folder lacks are left to the loaders."""
    try:
        step = int(read_format_json(folder / SIDECAR_FILE, FORMAT, VERSION, what="a world-model checkpoint",
                                    version_label="checkpoint", error=CheckpointError)["step"])
        for name in (MODEL_FILE, EMA_FILE, TRAINER_FILE):
            if (folder / name).is_file():
                with open_safetensors(folder / name, error=CheckpointError) as f:
                    if (f.metadata() or {}).get("step") != str(step):
                        return f"{folder / name}: belongs to another step than {folder / SIDECAR_FILE}"
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        return str(e)
    return None


def latest_checkpoint(run_dir: str | os.PathLike, *, problem_of: Callable[[Path], str | None] = checkpoint_problem,
                      marker: str = SIDECAR_FILE) -> Path | None:
    """The checkpoint latest.json points at, falling back to the newest usable one past a torn
    checkpoint (`checkpoint_folders.latest_checkpoint`); None for a run without one."""
    return folders.latest_checkpoint(run_dir, problem_of=problem_of, marker=marker)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder or a run folder holding latest.json."""
    return folders.resolve_checkpoint_folder(path, marker=SIDECAR_FILE, what="a world-model checkpoint",
                                             latest=latest_checkpoint)


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON sidecar of a checkpoint (or of a run's latest), after format and version checks."""
    folder = resolve_checkpoint(path)
    return read_format_json(folder / SIDECAR_FILE, FORMAT, VERSION, what="a world-model checkpoint",
                            version_label="checkpoint", error=CheckpointError)


@dataclass
class LoadedCheckpoint:
    folder: Path
    step: int
    sidecar: dict[str, Any]
    """The whole JSON sidecar (train config, data position, metrics... whatever was saved)."""
    rng_states: list[dict[str, Any]]
    """One state per rank that saved it; pass one to `restore_rng_state`."""


def check_model_config(path: str | os.PathLike, model_config: dict[str, Any]) -> None:
    """Raise CheckpointError naming every key where the code's model config differs."""
    sidecar = read_sidecar(path)
    diff = config_diff(model_config, sidecar["model_config"])
    if diff:
        raise CheckpointError(
            f"{resolve_checkpoint(path)}: model config mismatch between checkpoint and code: " + "; ".join(diff)
        )


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    model_config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: EMA | None = None,
) -> LoadedCheckpoint:
    """Load a checkpoint (folder, or a run's latest) into the given objects, strictly.

    The code's `model_config` must equal the saved one key for key. Objects passed as None are not
    loaded. RNG states are returned, not applied (the caller picks its rank's).
    """
    folder = resolve_checkpoint(path)
    check_model_config(folder, model_config)
    sidecar = read_sidecar(folder)
    step = int(sidecar["step"])

    _load_module(model, folder / MODEL_FILE, step, "the model weights", _recorded_sha256(sidecar, MODEL_FILE))
    if ema is not None:
        if sidecar.get("ema") is None:
            raise CheckpointError(f"{folder}: holds no EMA weights ({EMA_FILE})")
        _load_module(ema.module, folder / EMA_FILE, step, "the EMA weights", _recorded_sha256(sidecar, EMA_FILE))
        ema.num_updates = int(sidecar["ema"]["num_updates"])

    trainer_tensors = _read_tensors(folder / TRAINER_FILE, step, _recorded_sha256(sidecar, TRAINER_FILE))
    if optimizer is not None:
        saved_class = sidecar["optimizer"]["class"]
        if saved_class != type(optimizer).__name__:
            raise CheckpointError(f"{folder}: optimizer is {saved_class} in the checkpoint, {type(optimizer).__name__} in the code")
        names = {id(p): n for n, p in model.named_parameters()}
        optimizer_from_storage(optimizer, names, trainer_tensors, sidecar["optimizer"], folder)
    if scheduler is not None:
        if sidecar.get("scheduler") is None:
            raise CheckpointError(f"{folder}: holds no scheduler state")
        scheduler.load_state_dict(sidecar["scheduler"])
    rng_states = _rng_from_storage(trainer_tensors, sidecar["rng"])
    return LoadedCheckpoint(folder=folder, step=step, sidecar=sidecar, rng_states=rng_states)


def load_world_model(path: str | os.PathLike, *, weights: str = "ema", device: str | torch.device = "cpu"):
    """A `WorldModel` rebuilt from a checkpoint's config, with its EMA (default) or raw weights.

    Returns (model in eval mode, sidecar); the sidecar names the codec the model was trained with.
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    folder = resolve_checkpoint(path)
    sidecar = read_sidecar(folder)
    try:
        cfg = ModelConfig.from_dict(sidecar["model_config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder / SIDECAR_FILE}: model config does not fit this code ({e})") from None
    model = WorldModel(cfg, sigma_data=float(sidecar.get("sigma_data", 1.0)))
    file = EMA_FILE if weights == "ema" else MODEL_FILE
    if weights == "ema" and sidecar.get("ema") is None:
        raise CheckpointError(f"{folder}: holds no EMA weights; pass weights='model'")
    _load_module(model, folder / file, int(sidecar["step"]), f"the {weights} weights", _recorded_sha256(sidecar, file))
    return model.to(device).eval(), sidecar
