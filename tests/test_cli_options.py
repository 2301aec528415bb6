"""Command-line options derived from the config dataclasses (worldsim.commands.options)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from worldsim.cli import app
from worldsim.commands import options
from worldsim.commands.options import NOT_LITERAL, REQUIRED, config_fields, config_options


def plain(text: str) -> str:
    """Help output without colours, box lines or line breaks."""
    return re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m", "", text).replace("│", ""))


def command(*path: str):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def test_every_config_the_cli_reads_agrees_with_the_imported_dataclass():
    derived = sorted({(m, c) for m, c in options.DERIVED if m.startswith("worldsim.")})
    # train, train-codec, 3 evals, 3 benches, dream, collect, agent train, plan, play
    assert len(derived) >= 13, derived
    for module, class_name in derived:
        cls = getattr(importlib.import_module(module), class_name)
        read = config_fields(module, class_name)
        real = dataclasses.fields(cls)
        assert [f.name for f in read] == [f.name for f in real], class_name
        for f, r in zip(read, real):
            assert f.annotation == r.type, (class_name, f.name)
            if f.default is REQUIRED:
                assert r.default is dataclasses.MISSING and r.default_factory is dataclasses.MISSING, (class_name, f.name)
            elif f.default is not NOT_LITERAL:
                assert f.default == r.default, (class_name, f.name)


def test_every_train_config_field_is_a_train_option():
    from worldsim.codec.train import CodecTrainConfig
    from worldsim.train.trainer import TrainConfig

    train = {p.name for p in command("train").params}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= train
    assert {"sample_count", "sample_context", "sample_steps"} <= train  # set by hand nowhere before
    codec = {p.name for p in command("train-codec").params}
    assert {f.name for f in dataclasses.fields(CodecTrainConfig)} - codec == {"codec"}  # a CodecConfig: --preset


def test_every_config_field_of_the_other_commands_is_an_option():
    from worldsim.agents.imagination import AgentTrainConfig
    from worldsim.agents.planners import PlannerConfig
    from worldsim.collect import CollectConfig
    from worldsim.dream import DreamConfig
    from worldsim.viewer.app import ViewerConfig

    left_out = {  # fields a command sets another way, and why
        ("collect",): set(),
        ("dream",): set(),
        ("agent", "train"): {"policy_kwargs"},  # a dict: no flag yet
        ("plan",): {"goal_weight"},  # the command sets no goal image
        ("play",): set(),
    }
    configs = {("collect",): CollectConfig, ("dream",): DreamConfig, ("agent", "train"): AgentTrainConfig,
               ("plan",): PlannerConfig, ("play",): ViewerConfig}
    for path, cls in configs.items():
        names = {p.name for p in command(*path).params}
        assert {f.name for f in dataclasses.fields(cls)} - names == left_out[path], path
    flags = {o for p in command("collect").params for o in p.opts}
    assert {"-e", "--env-id", "-p", "--policy", "-n", "--episodes", "-d", "--dataset-id", "--env", "--dataset"} <= flags
    flags = {o for p in command("play").params for o in [*p.opts, *p.secondary_opts]}
    assert {"--real", "--no-real", "--record", "-c", "-d", "--record-fps"} <= flags
    flags = {o for p in command("agent", "train").params for o in p.opts}
    assert {"--env", "--env-id", "--hparam", "--context-walk", "--eval-deterministic"} <= flags


def test_help_is_the_field_doc_and_the_flags_are_unchanged():
    text = plain(CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output)
    assert "Windows per step on each rank (the global batch is batch_size * world_size). [default: 8]" in text
    # a backquoted field name in a doc reads as its flag
    assert "resume later to reach `--steps`" in text
    names = {o for p in command("train").params for o in p.opts}
    assert {"--dataset", "-d", "--set", "--codec", "--run-dir", "--stop-after", "--no-latent-cache", "--compile"} <= {
        *names, *(o for p in command("train").params for o in p.secondary_opts)}


def test_preset_and_variant_take_only_known_names():
    result = CliRunner().invoke(app, ["train", "-d", "x", "--codec", "y", "--preset", "huge"])
    assert result.exit_code == 2 and "huge" in result.output and "tiny" in result.output, result.output
    result = CliRunner().invoke(app, ["bench", "train", "--variants", "lssvwm", "--windows", "16,x"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output, result.output


def test_help_of_the_derived_commands_stays_torch_free():
    commands = [["train"], ["train-codec"], ["eval", "prediction"], ["eval", "realism"], ["eval", "memory"],
                ["bench", "data"], ["bench", "train"], ["bench", "rollout"]]
    script = ("import sys\nfrom typer.testing import CliRunner\nfrom worldsim.cli import app\n"
              f"for c in {commands!r}:\n    r = CliRunner().invoke(app, [*c, '--help'])\n"
              "    assert r.exit_code == 0 and '--help' in r.output, (c, r.output)\n"
              "assert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------ the decorator itself
@pytest.fixture
def config_module(tmp_path, monkeypatch):
    """A module `cli_options_fixture` with a config dataclass, importable by name."""
    (tmp_path / "cli_options_fixture.py").write_text(textwrap.dedent('''
        from __future__ import annotations
        from dataclasses import dataclass, field

        LIMIT = 3

        @dataclass
        class Config:
            path: str
            """Where the `steps` go.
            Second line of the doc."""
            steps: int = 10_000
            """Steps [of training]."""
            rate: float | None = None
            size: str = "small"
            """Model size."""
            windows: tuple[int, ...] = (16, 32)
            """Window lengths."""
            names: tuple[str, ...] = ("a",)
            fast: bool = True
            extra: dict = field(default_factory=dict)
            limit: int = LIMIT


        def later():
            pass
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cli_options_fixture"


def run(func, *args: str):
    cli = typer.Typer()
    cli.command()(func)
    cli.command("other")(lambda: None)
    return CliRunner().invoke(cli, [func.__name__, *args], env={"COLUMNS": "400"})


def test_fields_defaults_docs_types_and_conversions(config_module):
    fields = {f.name: f for f in config_fields(config_module, "Config")}
    assert fields["path"].default is REQUIRED and fields["path"].doc == "Where the `steps` go.\nSecond line of the doc."
    assert fields["steps"].default == 10_000 and fields["rate"].annotation == "float | None"
    assert fields["extra"].default is NOT_LITERAL and fields["limit"].default is NOT_LITERAL

    got = {}

    @config_options(config_module, "Config", skip=("extra", "limit"), minimum={"steps": 1},
                    choices={"size": ("small", "big")}, comma=("windows",))
    def cmd(verbose: bool = typer.Option(False, help="Say more."), **fields):
        got.update(fields, verbose=verbose)

    help_text = plain(run(cmd, "--help").output)
    assert "Where the `--steps` go. Second line of the doc. [required]" in help_text
    assert "Steps [of training]. [default: 10000]" in help_text  # brackets are not rich markup
    assert help_text.index("--path") < help_text.index("--fast") < help_text.index("--verbose")

    result = run(cmd, "--path", "p", "--size", "big", "--windows", "8,4", "--names", "x", "--names", "y", "--no-fast")
    assert result.exit_code == 0, result.output
    assert got == {"path": "p", "steps": 10_000, "rate": None, "size": "big", "windows": (8, 4),
                   "names": ("x", "y"), "fast": False, "verbose": False}
    assert type(got["size"]) is str
    assert run(cmd, "--path", "p", "--steps", "0").exit_code == 2  # below the minimum
    assert run(cmd, "--path", "p", "--size", "huge").exit_code == 2
    bad = run(cmd, "--path", "p", "--windows", "8,x")
    assert bad.exit_code == 2 and "comma-separated integers" in bad.output


def test_a_field_the_command_line_cannot_take_must_be_taken_or_skipped(config_module):
    def cmd(**fields):
        pass

    with pytest.raises(TypeError, match="Config.extra"):
        config_options(config_module, "Config")(cmd)
    with pytest.raises(TypeError, match="Config.limit: its default is not a literal"):
        config_options(config_module, "Config", skip=("extra",))(cmd)
    with pytest.raises(KeyError, match="stpes"):
        config_options(config_module, "Config", minimum={"stpes": 1})


def test_the_parameter_of_a_field_takes_its_place(config_module):
    @config_options(config_module, "Config", skip=("extra", "limit"))
    def cmd(windows: str = typer.Option("1", help="As the command reads it."), **fields):
        print(json.dumps({"windows": windows, **fields}))

    result = run(cmd, "--path", "p", "--windows", "5")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["windows"] == "5"
    text = plain(run(cmd, "--help").output)
    assert text.index("--size") < text.index("As the command reads it.") < text.index("--names")


@pytest.mark.parametrize("args", [["train", "-d", "x", "--codec", "y"], ["train-codec", "-d", "x", "--out", "z"]])
def test_init_from_bundled_without_a_bundle_is_one_bad_parameter(args):
    """Both trainers read `--init-from bundled` the same way (conftest points the bundle elsewhere)."""
    result = CliRunner().invoke(app, [*args, "--init-from", "bundled"], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert "--init-from" in result.output and "no bundled model is installed" in result.output
