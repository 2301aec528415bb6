"""What every `worldsim` command shares: one-line errors and checks of option values.

`WorldsimGroup` is the top-level command group: a bad option or value (click's usage errors) and
the errors a user can cause (a missing or corrupt file, a bad setting: `ValueError`s, missing
files) end the command with one line, `error: ...`, and a non-zero exit code instead of a
traceback. WORLDSIM_TRACEBACK=1 shows the traceback of the latter (for bug reports). Anything
else (a bug) keeps its traceback.

Imports stay light: `worldsim --help` must not import torch.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.16 vendors click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import ClickException, UsageError

TRACEBACK_ENV_VAR = "WORLDSIM_TRACEBACK"

# Errors a user causes with a bad argument or file. Our loaders raise ValueError subclasses
# (CheckpointError, BundleError) or FileNotFoundError, each message naming the file.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
)


def one_line(message: object) -> str:
    """The message on one line (a multi-line one is joined with ' | ')."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    return " | ".join(lines) if lines else type(message).__name__


def fail(message: object, code: int = 2) -> typer.Exit:
    """Print `error: message` on stderr; returns the Exit to raise (`raise fail(e) from None`).
    An exception given as the message is re-raised instead when $WORLDSIM_TRACEBACK is set."""
    if isinstance(message, BaseException) and os.environ.get(TRACEBACK_ENV_VAR):
        raise message
    typer.echo(f"error: {one_line(message)}", err=True)
    return typer.Exit(code)


class WorldsimGroup(TyperGroup):
    """The `worldsim` group: one-line errors for usage errors and user errors (see the module doc)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                              standalone_mode=False, **extra)
        except UsageError as e:
            message = e.format_message().strip()
            if type(e).__name__ == "NoArgsIsHelpError" or not message:  # the help was printed: no error line
                if message and type(e).__name__ == "NoArgsIsHelpError":
                    typer.echo(message, err=True)
                sys.exit(e.exit_code)
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            typer.echo(f"error: {one_line(message)}{hint}", err=True)
            sys.exit(e.exit_code)
        except ClickException as e:
            typer.echo(f"error: {one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        except USER_ERRORS as e:
            if os.environ.get(TRACEBACK_ENV_VAR):
                raise
            typer.echo(f"error: {one_line(e)}", err=True)
            sys.exit(1)
        # Non-standalone mode returns the code of a typer.Exit raised by a command (None on success).
        sys.exit(rv if isinstance(rv, int) else 0)


# ------------------------------------------------------------------------------ option checks
def at_least_one(**values: int) -> None:
    """ValueError naming the first option below 1: at_least_one(steps=steps) -> '--steps must be >= 1, got -5'."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def existing_path(value: str | os.PathLike, flag: str) -> Path:
    """The path, or FileNotFoundError naming the flag when nothing is there."""
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{flag} {value}: no such file or folder")
    return path


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a dataclass field's type (int, float, bool, str, None, unions,
    tuple[...] / list[...] of those)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return all(_fits(v, args[0]) for v in value) if args else True
    return True  # a type this check does not know: leave it to the config's own validation


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_model_overrides(pairs: list[str]) -> None:
    """`worldsim train --set KEY=VALUE` values against ModelConfig's fields, before any data or
    model is loaded: typer.BadParameter naming the key, the value and the type it needs."""
    if not pairs:
        return
    import json

    from worldsim.model.config import ModelConfig

    hints = typing.get_type_hints(ModelConfig)
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    for item in pairs:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        if key not in names:
            raise typer.BadParameter(f"unknown model config field {key!r}; fields: {', '.join(names)}", param_hint="--set")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string, as `worldsim train` reads it
        if not _fits(value, hints[key]):
            raise typer.BadParameter(f"{key}={raw}: {key} must be {_type_name(hints[key])} (a JSON value, "
                                     f"e.g. --set n_layers=4)", param_hint="--set")


def merge_alias(value: Any, alias: Any, default: Any, spelling: str, alias_spelling: str) -> Any:
    """One option spelt two ways (a hidden alias beside the documented flag): the alias's value
    when given, unless the documented flag was given another value too (typer.BadParameter)."""
    if alias is None:
        return value
    if value != default and value != alias:
        raise typer.BadParameter(f"{spelling} {value!r} and {alias_spelling} {alias!r} name the same option; give one",
                                 param_hint=spelling)
    return alias


def bundled_or_given(value: str | None, flag: str) -> str | None:
    """'bundled' -> the installed bundle's folder (typer.BadParameter, exit 2, when none is
    installed); anything else as given."""
    if value != "bundled":
        return value
    from worldsim.bundled import bundled_model_dir  # here, not at the top: `worldsim --help` must not import torch

    folder = bundled_model_dir()
    if folder is None:
        raise typer.BadParameter("no bundled model is installed", param_hint=flag)
    return str(folder)


def resolve_device(name: str) -> str:
    """--device as torch takes it: "auto" is cuda when available, else cpu; anything else as given."""
    if name != "auto":
        return name
    import torch  # here, not at the top: `worldsim --help` must not import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
