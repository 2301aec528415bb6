"""The README's Python snippets, run as written: the real maze, the dream with the shipped bundle
and SB3 in one call, and the window loader (on a small dataset collected under the README's id)."""

import re
from pathlib import Path

import pytest

from worldsim.bundled import ENV_VAR, PACKAGE_BUNDLE_DIR, is_bundle

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(containing: str) -> str:
    """The one ```python block of the README that contains `containing`."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if containing in b]
    assert len(blocks) == 1, f"{len(blocks)} README python blocks contain {containing!r}"
    return blocks[0]


def run(code: str) -> dict:
    scope: dict = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 (our own README)
    return scope


def test_environment_snippet():
    scope = run(snippet('gym.make("worldsim/MemoryMaze-9x9-v0")'))
    assert scope["obs"].shape == (64, 64, 3) and "target_color" in scope["info"]
    scope["env"].close()


@pytest.mark.slow
def test_dream_and_sb3_snippet_with_the_shipped_bundle(monkeypatch, one_thread):
    if not is_bundle(PACKAGE_BUNDLE_DIR):
        pytest.skip(f"no bundled model in this checkout ({PACKAGE_BUNDLE_DIR})")
    monkeypatch.setenv(ENV_VAR, str(PACKAGE_BUNDLE_DIR))  # the tests hide the bundle by default
    scope = run(snippet("make_sb3_vec_env"))
    assert scope["obs"].shape == (64, 64, 3) and isinstance(scope["terminated"], bool)
    assert scope["envs"].num_envs == 8 and scope["vec"].num_envs == 8
    for env in (scope["env"], scope["envs"], scope["vec"]):
        env.close()


def test_window_loader_snippet(tmp_path, monkeypatch):
    from worldsim.collect import CollectConfig, collect

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    # The README's `worldsim collect ... --dataset-id worldsim/mm9-revisit-v0`, smaller.
    collect(CollectConfig(env_id="worldsim/MemoryMaze-9x9-v0", policy="revisit", episodes=2, workers=1,
                          max_steps=40, seed=0, dataset_id="worldsim/mm9-revisit-v0", progress=False))
    scope = run(snippet("WindowDataset"))
    assert tuple(scope["batch"]["frames"].shape) == (8, 32, 64, 64, 3)


def readme_commands() -> list[list[str]]:
    """Every `worldsim ...` command line of the README's bash blocks, as words (continuations
    joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("#")[0].split("&&"):
                words = part.split()
                for i, word in enumerate(words):
                    if word.endswith("worldsim") and "/" not in word.replace(".venv/bin/", ""):
                        commands.append(words[i + 1 :])
                        break
    return commands


def test_readme_commands_name_real_subcommands_and_options():
    """Each command of the README's bash blocks names a real subcommand and only options it has,
    so a renamed flag cannot leave the front door pointing at nothing."""
    import typer.main

    from worldsim.cli import app

    root = typer.main.get_command(app)
    commands = readme_commands()
    assert len(commands) >= 15, commands
    checked = set()
    for words in commands:
        command, path = root, []
        while words and hasattr(command, "commands") and words[0] in command.commands:
            command = command.commands[words[0]]
            path.append(words.pop(0))
        assert path and not hasattr(command, "commands"), f"`worldsim {' '.join(path + words[:1])}` is not a command"
        options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        used = {w.split("=")[0] for w in words if w.startswith("-") and w != "-"}
        assert used <= options, f"`worldsim {' '.join(path)}` has no option {sorted(used - options)}"
        checked.add(" ".join(path))
    assert {"dream", "collect", "train", "train-codec", "eval prediction", "agent train", "pack"} <= checked
