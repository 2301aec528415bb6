"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX needs the directory itself synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the finished folder `tmp` to `final`, replacing any folder there, with `final` never
    missing: the old one is first renamed aside to `.<name>.old-<pid>` (which
    `remove_stale_temp_dirs` cleans if a kill leaves it), then `tmp` is renamed into place, the
    parent synced, and the old one deleted."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and sets show up in metadata; JSON has lists and numbers.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, set):
        return sorted(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in JSON")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=_json_default).encode())


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (weights can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: str | os.PathLike, expected: str | None, error: type[Exception] = ValueError, *,
                 recorded_by: str = "the checkpoint", remedy: str = "restore it or use another checkpoint") -> None:
    """Raise `error` naming `path` when its sha256 is not `expected` (one `recorded_by` recorded when
    the file was written); None (nothing recorded: an older checkpoint or dataset) checks nothing."""
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise error(f"{path}: corrupt (its sha256 is {actual[:16]}..., {recorded_by} recorded {expected[:16]}... "
                    f"when writing it): the file changed on disk or in a copy; {remedy}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (True when unsure: another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_dirs(root: str | os.PathLike, markers: tuple[str, ...] = (".tmp-", ".old-")) -> list[Path]:
    """Delete the hidden `.<name><marker><pid>` folders in `root` whose writer process is dead.

    A checkpoint is written into `.<name>.tmp-<pid>` and renamed into place (an old folder of the
    same name is moved to `.<name>.old-<pid>` first); a kill in between leaves the folder behind.
    Folders of live processes (a writer running now) are kept. Returns what was deleted."""
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for child in root.iterdir():
        if not child.name.startswith(".") or not child.is_dir():
            continue
        for marker in markers:
            _, found, pid = child.name.rpartition(marker)
            if found and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
                break
    return removed
