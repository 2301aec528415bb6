"""Opening safetensors files so that a broken one is named in the caller's own error class, and
comparing what a file holds with what the code expects (`tensor_diff`).

safetensors reports a truncated file, an empty one or a pickled torch file given a .safetensors
name as a bare `SafetensorError: Error while deserializing header: ...` that names no file.
`open_safetensors` is `safe_open` with that error (and any error reading a tensor later) turned
into one message naming the file and what it probably is.

`safetensors_bytes` is `safetensors.torch.save` with the header's metadata in a fixed order:
safetensors keeps metadata in a Rust hash map, so the same weights came out as different bytes
(and a different sha256) from one save to the next, and a re-bundled unchanged codec went into the
history again.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _save


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors file of `tensors`, byte for byte the same for the same tensors and metadata."""
    data = _save(tensors, metadata=metadata)
    if not metadata:
        return data
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    # The tensor entries come sorted (by dtype alignment, then name) already; only metadata moves,
    # so the header keeps its length and the data offsets stay valid.
    fixed = json.dumps(header, separators=(",", ":")).encode()
    if len(fixed) > size:  # pragma: no cover - would mean safetensors changed its header layout
        return data
    return data[:8] + fixed.ljust(size, b" ") + data[8 + size:]


def describe(file: str | os.PathLike, error: BaseException) -> str:
    """One line: the file, what is wrong with it, safetensors' own words."""
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (f"{file}: unreadable safetensors file: truncated, or not a safetensors file "
            f"(e.g. a pickled torch checkpoint) ({detail})")


@contextmanager
def open_safetensors(file: str | os.PathLike, *, error: type[Exception], framework: str = "pt",
                     device: str = "cpu") -> Iterator[Any]:
    """`safe_open(file, framework, device)`; a missing file, a bad header or a tensor that cannot
    be read raise `error` naming the file. Errors the caller raises inside the block pass as they are."""
    path = Path(file)
    if not path.is_file():
        raise error(f"{path}: missing")
    try:
        with safe_open(str(path), framework=framework, device=device) as f:
            yield f
    except SafetensorError as e:
        raise error(describe(path, e)) from None


def tensor_diff(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and mis-shaped tensors, each list naming the keys."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors (in the code, not in the checkpoint) {missing}")
    if unexpected:
        problems.append(f"unexpected tensors (in the checkpoint, not in the code) {unexpected}")
    shapes = [
        f"{k}: code {tuple(v.shape)}, checkpoint {tuple(found[k].shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    if shapes:
        problems.append(f"mis-shaped tensors [{'; '.join(shapes)}]")
    return problems
