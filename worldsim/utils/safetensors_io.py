"""Opening safetensors files so that a broken one is named in the caller's own error class.

safetensors reports a truncated file, an empty one or a pickled torch file given a .safetensors
name as a bare `SafetensorError: Error while deserializing header: ...` that names no file.
`open_safetensors` is `safe_open` with that error (and any error reading a tensor later) turned
into one message naming the file and what it probably is.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open


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
