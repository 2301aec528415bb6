"""Reading the JSON header of one of our on-disk formats (codec, world-model and agent checkpoints).

Each header carries "format" and "version"; a file of another format or version is refused with
one message naming the file, in the caller's own error class. So is a file that is not JSON, not
UTF-8 text, or whose JSON is not an object (a list, a number...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(file: Path, *, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in `file`, or `error` naming the file when it is missing, unreadable, not
    UTF-8, not JSON, or JSON but not an object."""
    try:
        header = json.loads(Path(file).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{file}: missing") from None
    except UnicodeDecodeError as e:
        raise error(f"{file}: not UTF-8 text, so not a JSON header ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{file}: corrupt JSON ({e})") from None
    except OSError as e:
        raise error(f"{file}: unreadable ({e.strerror or e})") from None
    if not isinstance(header, dict):
        raise error(f"{file}: corrupt header (a JSON {type(header).__name__}, expected an object)")
    return header


def read_format_json(file: Path, fmt: str, version: Any, *, what: str, version_label: str,
                     error: type[Exception]) -> dict[str, Any]:
    """The JSON object in `file` after checking its format and version.

    what: the article and noun for a wrong format ("a codec checkpoint");
    version_label: the noun before "format version" ("checkpoint", "agent")."""
    header = read_json_object(file, error=error)
    if header.get("format") != fmt:
        raise error(f"{file}: not {what} (format {header.get('format')!r}, expected {fmt!r})")
    if header.get("version") != version:
        raise error(f"{file}: {version_label} format version {header.get('version')!r}; this code reads version {version}")
    return header
