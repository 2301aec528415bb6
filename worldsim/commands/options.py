"""Command-line options derived from a config dataclass (as CleanRL/tyro derive them): one option
per field, named after it (`batch_size` -> `--batch-size`), with the field's default and, as its
help, the docstring written under the field. A field added to a config reaches the command that
builds it without being restated there.

    @config_options("worldsim.train.trainer", "TrainConfig", minimum={"window": 3})
    def train(model_overrides: list[str] = typer.Option([], "--set", help="..."), **fields) -> None:
        config = TrainConfig(model_overrides=parse(model_overrides), **fields)

The dataclass is read from its module's source, not imported: the configs live beside the code
they configure (the trainer, the evaluations, the benchmarks), which imports torch, and
`worldsim --help` must not. The command still imports the class to build it, and
tests/test_cli_options.py checks that the source read agrees with the imported dataclass.
"""

from __future__ import annotations

import ast
import enum
import functools
import importlib.util
import inspect
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

REQUIRED = ...
"""The default of a field that has none: typer's marker of a required option."""


class _NotLiteral:
    def __repr__(self) -> str:
        return "NOT_LITERAL"


NOT_LITERAL: Any = _NotLiteral()
"""The default of a field whose default is not a literal (a constant's name, a factory): such a
field has no derived option; the command takes it itself or skips it."""

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}

DERIVED: list[tuple[str, str]] = []
"""(module, class name) of every config a command derives options from (the tests check each)."""


@dataclass(frozen=True)
class ConfigField:
    name: str
    annotation: str
    """The type as written in the source, e.g. "int | None"."""
    default: Any
    """The literal default; REQUIRED when there is none, NOT_LITERAL when it is not a literal."""
    doc: str
    """The docstring under the field, dedented ("" when it has none)."""


# ------------------------------------------------------------------------------ reading the source
@functools.cache
def _source_lines(module: str) -> tuple[str, ...]:
    spec = importlib.util.find_spec(module)  # imports the parent packages only (they import nothing)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"no module {module}")
    return tuple(Path(spec.origin).read_text(encoding="utf-8").splitlines(keepends=True))


def _definition(module: str, name: str) -> ast.stmt:
    """The top-level statement that defines `name` (`class name` or `name = ...`), parsed on its
    own: parsing the whole modules would add tens of milliseconds to every command."""
    lines = _source_lines(module)
    pattern = re.compile(rf"(class\s+{name}\b|{name}\s*[:=])")
    start = next((i for i, line in enumerate(lines) if pattern.match(line)), None)
    if start is None:
        raise LookupError(f"{module} defines no top-level {name}")
    # The statement ends before one of the following lines that start in column 0.
    ends = [i for i in range(start + 1, len(lines)) if lines[i][:1] not in ("", " ", "\t", "\n", "\r", "#")]
    for end in [*ends, len(lines)]:
        try:
            return ast.parse("".join(lines[start:end])).body[0]
        except SyntaxError:
            continue
    raise LookupError(f"{module}.{name}: its definition does not parse")


def _literal_default(node: ast.expr | None) -> Any:
    if node is None:
        return REQUIRED
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "field":
        keywords = {k.arg: k.value for k in node.keywords}
        return _literal_default(keywords["default"]) if "default" in keywords else NOT_LITERAL
    try:
        return ast.literal_eval(node)
    except ValueError:
        return NOT_LITERAL


def config_fields(module: str, class_name: str) -> list[ConfigField]:
    """The fields of the dataclass `module.class_name`, in order, read from the source."""
    node = _definition(module, class_name)
    if not isinstance(node, ast.ClassDef):
        raise LookupError(f"{module}.{class_name} is not a class")
    fields = []
    for stmt, after in zip(node.body, [*node.body[1:], None]):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        annotation = ast.unparse(stmt.annotation)
        if annotation.startswith(("ClassVar", "typing.ClassVar")):
            continue
        doc = ""
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            doc = inspect.cleandoc(after.value.value)
        fields.append(ConfigField(stmt.target.id, annotation, _literal_default(stmt.value), doc))
    return fields


def config_defaults(module: str, class_name: str) -> dict[str, Any]:
    """{field name: literal default} of the dataclass `module.class_name`, from the source."""
    return {f.name: f.default for f in config_fields(module, class_name)}


def dict_keys(module: str, name: str) -> tuple[str, ...]:
    """The keys of the top-level dict literal `module.name` (e.g. a PRESETS table), from the source."""
    node = _definition(module, name)
    value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
    if not isinstance(value, ast.Dict) or not all(isinstance(k, ast.Constant) for k in value.keys):
        raise LookupError(f"{module}.{name} is not a dict literal with constant keys")
    return tuple(k.value for k in value.keys)  # type: ignore[union-attr]


def tuple_items(module: str, name: str) -> tuple[str, ...]:
    """The items of the top-level tuple literal of strings `module.name` (e.g. a table of policy
    names), from the source."""
    node = _definition(module, name)
    value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
    if not isinstance(value, ast.Tuple) or not all(isinstance(e, ast.Constant) and isinstance(e.value, str)
                                                   for e in value.elts):
        raise LookupError(f"{module}.{name} is not a tuple literal of strings")
    return tuple(e.value for e in value.elts)  # type: ignore[union-attr]


def choice_enum(name: str, values: Iterable[str]) -> type[enum.Enum]:
    """A str Enum of the values, typer's way of offering choices."""
    return enum.Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


# ------------------------------------------------------------------------------ types
def _cli_type(node: ast.expr) -> tuple[Any, Any]:
    """(the type typer parses, the item type of a variadic tuple or list field, else None)."""
    if isinstance(node, ast.Name) and node.id in _SCALARS:
        return _SCALARS[node.id], None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # X | None
        sides = [node.left, node.right]
        others = [s for s in sides if not (isinstance(s, ast.Constant) and s.value is None)]
        if len(others) == 1:
            inner, item = _cli_type(others[0])
            if item is None:
                return typing.Optional[inner], None  # noqa: UP007 (typer reads Optional)
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in ("tuple", "list"):
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        variadic = node.value.id == "list" or (
            len(args) == 2 and isinstance(args[1], ast.Constant) and args[1].value is Ellipsis)
        if variadic and isinstance(args[0], ast.Name) and args[0].id in _SCALARS:
            item = _SCALARS[args[0].id]
            return list[item], item
    raise TypeError(f"no command-line form for {ast.unparse(node)}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(doc: str, names: set[str]) -> str:
    """The field doc as option help: one paragraph, `field` names written as their flags."""
    text = " ".join(doc.split())
    text = re.sub(r"`(\w+)`", lambda m: f"`{_flag(m[1])}`" if m[1] in names else m[0], text)
    return escape(text)  # typer renders help as rich markup: brackets in a doc stay brackets


# ------------------------------------------------------------------------------ the decorator
def config_options(
    module: str,
    class_name: str,
    *,
    skip: Iterable[str] = (),
    minimum: Mapping[str, float] | None = None,
    choices: Mapping[str, Iterable[str] | type[enum.Enum]] | None = None,
    comma: Iterable[str] = (),
    helps: Mapping[str, str] | None = None,
    short: Mapping[str, str] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a typer command an option for every field of the config `module.class_name` that it
    does not take itself (a parameter of the same name, which takes the field's place in the
    help) or `skip`, in the order of the fields, before its other parameters. The command
    receives them as keyword arguments (`**fields`) ready for the config: variadic tuples as
    tuples, choices as strings.

    minimum: the lowest value of a numeric option. choices: the values a str option takes (a tuple of
    names or a str Enum). comma: tuple fields given as one comma-separated value (`--windows
    16,32`) rather than a repeated option. helps: replace a field's doc as the option's help.
    short: a one-letter flag beside the long one (`{"episodes": "-n"}`).
    A field whose type has no command-line form, or whose default is not a literal, must be taken
    or skipped (TypeError otherwise, when the CLI loads).
    """
    minimum, choices, helps, comma = dict(minimum or {}), dict(choices or {}), dict(helps or {}), set(comma)
    short = dict(short or {})
    fields = config_fields(module, class_name)
    names = {f.name for f in fields}
    DERIVED.append((module, class_name))
    for given in (set(skip), set(minimum), set(choices), set(helps), comma, set(short)):
        if given - names:
            raise KeyError(f"{class_name} has no field {sorted(given - names)}")

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        signature, hints = inspect.signature(func), typing.get_type_hints(func)
        own = {p.name: p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
               for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD}
        params, annotations, convert = [], {}, {}
        for f in fields:
            if f.name in own:
                params.append(own.pop(f.name))
                continue
            if f.name in skip:
                continue
            where = f"{class_name}.{f.name}"
            if f.default is NOT_LITERAL:
                raise TypeError(f"{where}: its default is not a literal; take or skip it in {func.__name__}")
            try:
                kind, item = _cli_type(ast.parse(f.annotation, mode="eval").body)
            except TypeError as e:
                raise TypeError(f"{where}: {e}; take or skip it in {func.__name__}") from None
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            text = helps.get(f.name, _help(f.doc, names))
            if f.name in comma:
                if item is None:
                    raise TypeError(f"{where}: comma= needs a tuple field")
                kind, default = str, ",".join(map(str, default))
                text += " Comma-separated."
            options: dict[str, Any] = {"help": text}
            if f.name in minimum:
                options["min"] = minimum[f.name]
            if f.name in choices:
                values = choices[f.name]
                kind = values if isinstance(values, type) else choice_enum(f.name, values)
                default = kind(default) if default is not REQUIRED else default
            flags = (_flag(f.name), short[f.name]) if f.name in short else ()
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                            default=typer.Option(default, *flags, **options), annotation=kind))
            annotations[f.name] = kind
            convert[f.name] = functools.partial(_to_config, item=item, comma=f.name in comma, flag=_flag(f.name))

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            for name, to_config in convert.items():
                kwargs[name] = to_config(kwargs[name])
            return func(**kwargs)

        command.__signature__ = signature.replace(parameters=[*params, *own.values()])  # type: ignore[attr-defined]
        command.__annotations__ = {**hints, **annotations}
        return command

    return decorate


def _to_config(value: Any, item: Any, comma: bool, flag: str) -> Any:
    """An option's value as the config field takes it."""
    if isinstance(value, enum.Enum):
        return value.value
    if comma:
        try:
            return tuple(item(x.strip()) for x in value.split(","))
        except ValueError:
            kind = {int: "integers", float: "numbers"}.get(item, "values")
            raise typer.BadParameter(f"expected comma-separated {kind}, got {value!r}", param_hint=flag) from None
    if item is not None and value is not None:
        return tuple(value)
    return value
