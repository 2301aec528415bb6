"""The package import graph stays acyclic (docs/architecture.md draws the layers).

Packages: each sub-package or top-level module of `worldsim` (worldsim.model, worldsim.bundled...),
with envs/ and agents/ read as what they install as (worldsim.envs, worldsim.agents). Every import
counts, also those inside functions: a cycle hidden in a function is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"worldsim": REPO / "worldsim", "worldsim.envs": REPO / "envs", "worldsim.agents": REPO / "agents"}


def module_name(file: Path) -> str:
    for package, root in sorted(SOURCES.items(), key=lambda kv: -len(kv[0])):  # envs/ before worldsim/
        if file.is_relative_to(root):
            parts = list(file.relative_to(root).with_suffix("").parts)
            return ".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])
    raise ValueError(file)


def package_of(module: str, packages: set[str]) -> str | None:
    """The package a `worldsim...` module name belongs to (None: `worldsim` itself, or not ours)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and ".".join(parts[:2]) in packages else None


def import_graph() -> dict[str, dict[str, list[str]]]:
    """{package: {imported package: ["file:line", ...]}} over every import in the source."""
    files = [f for root in SOURCES.values() for f in root.rglob("*.py") if "assets" not in f.parts]
    packages = {package_of(module_name(f), {".".join(module_name(f).split(".")[:2])}) for f in files} - {None}
    graph: dict[str, dict[str, list[str]]] = {}
    for file in files:
        here = package_of(module_name(file), packages)
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]  # from worldsim import bundled
            else:
                continue
            for name in names:
                there = package_of(name, packages)
                where = f"{file.relative_to(REPO)}:{node.lineno}"
                if here and there and there != here and where not in graph.setdefault(here, {}).setdefault(there, []):
                    graph[here][there].append(where)
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of packages as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in graph.get(node, {}):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_import_graph_is_acyclic():
    graph = import_graph()
    assert {"worldsim.model", "worldsim.envs", "worldsim.agents", "worldsim.rollout"} <= set(graph)  # it read them
    cycle = find_cycle(graph)
    where = [f"{a} -> {b}: {', '.join(graph[a][b][:3])}" for a, b in zip(cycle, cycle[1:])] if cycle else []
    assert cycle is None, "package import cycle:\n" + "\n".join(where)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b": ["x:1"]}, "b": {"c": ["y:2"]}, "c": {"a": ["z:3"]}, "d": {"a": ["w:4"]}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": []}, "b": {}}) is None


def function_level_imports_without_a_reason() -> list[str]:
    """`file:line` of every import inside a function, outside worldsim/commands/, with no comment
    on its line or the line above. Imports belong at the top of a module; one that stays in a
    function (optional dependency, `--help` or env-registration speed, a cycle, the GPU job's
    minimal imports) says why in one line. The command modules all defer their imports for the
    one reason worldsim/cli.py gives."""
    missing = []
    for root in SOURCES.values():
        for file in sorted(root.rglob("*.py")):
            if file.is_relative_to(REPO / "worldsim" / "commands"):
                continue
            lines = file.read_text(encoding="utf-8").splitlines()
            for node in ast.walk(ast.parse("\n".join(lines))):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        line, above = lines[inner.lineno - 1], lines[inner.lineno - 2].strip()
                        if "#" not in line and not above.startswith("#"):
                            missing.append(f"{file.relative_to(REPO)}:{inner.lineno}")
    return sorted(set(missing))


def test_imports_inside_functions_say_why():
    assert function_level_imports_without_a_reason() == []
