"""The installable package matches the source tree, and the console command starts."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import name -> folder, as mapped by [tool.setuptools] package-dir in pyproject.toml.
FOLDERS = {"worldsim": ROOT / "worldsim", "worldsim.envs": ROOT / "envs", "worldsim.agents": ROOT / "agents"}


def _source_packages() -> set[str]:
    found = set()
    for name, folder in FOLDERS.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((name, *rel)))
    return found


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == _source_packages()
    assert {k: ROOT / v for k, v in config["package-dir"].items()} == FOLDERS


def test_torch_is_pinned_to_the_local_cpu_wheel():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps


def test_console_command_help():
    out = subprocess.run(
        [sys.executable, "-m", "worldsim.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("collect", "ingest", "bench"):
        assert command in out
