"""The run-folder side of every checkpoint format (world model, codec, agent): one layout, one error.

    <run>/latest.json                      {"step": N, "checkpoint": "checkpoints/step_00000N", ...}
    <run>/checkpoints/step_00000N/         the format's own files
    <run>/tb/                              TensorBoard logs

What a checkpoint folder holds, and how it is checked, belongs to each format (`train.checkpoint`,
`codec.checkpoint`, `agents.agent_checkpoint`); writing one into place, the latest pointer, the
fallback past a torn checkpoint and pruning are the same for all, and live here.

Commit protocol: a format writes its files into `temp_folder(...)` (a hidden `.<name>.tmp-<pid>`),
then `commit_checkpoint` renames it into place and replaces latest.json atomically. A kill at any
moment leaves latest.json pointing at a complete checkpoint; the hidden folder a killed writer
leaves behind is removed by the next writer.

Folder names: `step_<step, 6+ digits>`. Codec runs written before 2026-11-26 used
`step-<8 digits>`; they are still listed, pruned, resumed and loaded (latest.json names them).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from worldsim.utils.atomic import atomic_write_json, remove_stale_temp_dirs, replace_dir

LATEST_FILE = "latest.json"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tb"
_NAME = re.compile(r"step[_-](\d+)")  # step_000012, or a legacy codec run's step-00000012

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or resumed as asked; the message names the file and keys."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def temp_folder(run_dir: str | os.PathLike, step: int) -> Path:
    """An empty hidden folder to write checkpoint `step` into (then `commit_checkpoint`)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(root)  # .step_*.tmp-PID / .old-PID left by a writer killed mid-save
    tmp = root / f".{checkpoint_name(step)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_checkpoint(run_dir: str | os.PathLike, tmp: Path, step: int, *, pointer: dict[str, Any] | None = None,
                      keep: int | None = None, marker: str | None = None) -> Path:
    """Rename the written `tmp` folder into place as checkpoint `step`, point latest.json at it
    (`pointer` adds fields to it), and with `keep` delete all but the newest `keep` complete
    checkpoints (those holding `marker`). Returns the checkpoint folder."""
    run_dir = Path(run_dir)
    name = checkpoint_name(step)
    final = run_dir / CHECKPOINTS_DIR / name
    replace_dir(tmp, final)  # replaces the same step written by an earlier, crashed session
    atomic_write_json(run_dir / LATEST_FILE, {"step": step, **(pointer or {}), "checkpoint": f"{CHECKPOINTS_DIR}/{name}"})
    if keep is not None:
        if marker is None:
            raise ValueError("pruning needs the marker file of a complete checkpoint")
        prune_checkpoints(run_dir, keep, marker)
    return final


def _step_of(folder: Path) -> int | None:
    match = _NAME.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | os.PathLike, marker: str) -> list[Path]:
    """Complete checkpoint folders of a run (those holding `marker`), oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _step_of(p) is not None and (p / marker).is_file()]
    return sorted(found, key=_step_of)


def prune_checkpoints(run_dir: str | os.PathLike, keep: int, marker: str) -> None:
    """Delete all but the newest `keep` checkpoints; never the one latest.json points at."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    try:
        latest = read_latest_pointer(run_dir)
    except CheckpointError:
        latest = None
    for old in list_checkpoints(run_dir, marker)[:-keep]:
        if latest is None or old.resolve() != latest.resolve():
            shutil.rmtree(old, ignore_errors=True)


def read_latest_pointer(run_dir: str | os.PathLike) -> Path | None:
    """The folder latest.json names (whatever it holds), or None for a run without latest.json."""
    pointer = Path(run_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    try:
        latest = json.loads(pointer.read_text())
        if not isinstance(latest["checkpoint"], str):
            raise TypeError("\"checkpoint\" is not a path")
        return Path(run_dir) / latest["checkpoint"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{pointer}: corrupt pointer ({e})") from None


def latest_checkpoint(run_dir: str | os.PathLike, *, problem_of: Callable[[Path], str | None], marker: str) -> Path | None:
    """The checkpoint latest.json points at, or None for a run without one.

    When that one is unusable (`problem_of` says why: gone, a header corrupt or truncated) the
    newest complete checkpoint that is usable is returned instead, with a warning naming the one
    skipped (so `--resume` continues from it); CheckpointError when there is none."""
    try:
        target = read_latest_pointer(run_dir)
        if target is None:
            return None
        problem = problem_of(target)
    except CheckpointError as e:
        target, problem = None, str(e)
    if problem is None:
        return target
    for candidate in reversed(list_checkpoints(run_dir, marker)):
        if target is not None and candidate.resolve() == target.resolve():
            continue
        if problem_of(candidate) is None:
            log.warning("skipping %s (%s); using %s, the newest complete checkpoint",
                        target if target is not None else Path(run_dir) / LATEST_FILE, problem, candidate)
            return candidate
    raise CheckpointError(f"{problem}; the run holds no other complete checkpoint to fall back to")


def resolve_checkpoint_folder(path: str | os.PathLike, *, marker: str, what: str,
                              latest: Callable[[Path], Path | None] = read_latest_pointer, hint: str = "") -> Path:
    """A checkpoint folder (one holding `marker`) from itself, or from a run folder through its
    latest.json (`latest`: the format's reader of it, with or without the fallback past a torn
    checkpoint). `what` names the format in the error ("an agent checkpoint"); `hint` ends it."""
    path = Path(path).expanduser()
    if (path / marker).is_file():
        return path
    found = latest(path)  # None without latest.json
    if found is not None:
        if not (found / marker).is_file():
            raise CheckpointError(f"{path / LATEST_FILE} points at {found}, which holds no {marker}")
        return found
    raise CheckpointError(f"{path}: neither {what} (no {marker}) nor a run (no {LATEST_FILE} pointing at one){hint}")
