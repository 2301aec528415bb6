"""Reading the JSON header of one of our on-disk formats (codec, world-model and agent checkpoints).

Each header carries "format" and "version"; a file of another format or version is refused with
one message naming the file, in the caller's own error class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_format_json(file: Path, fmt: str, version: Any, *, what: str, version_label: str,
                     error: type[Exception]) -> dict[str, Any]:
    """The JSON object in `file` after checking its format and version.

    what: the article and noun for a wrong format ("a codec checkpoint");
    version_label: the noun before "format version" ("checkpoint", "agent")."""
    try:
        header = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{file}: corrupt JSON ({e})") from None
    if header.get("format") != fmt:
        raise error(f"{file}: not {what} (format {header.get('format')!r}, expected {fmt!r})")
    if header.get("version") != version:
        raise error(f"{file}: {version_label} format version {header.get('version')!r}; this code reads version {version}")
    return header
