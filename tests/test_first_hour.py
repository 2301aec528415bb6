"""A new user's first hour (issue 10): bad flags, paths and files end in one clear line, agents of
`worldsim agent train` drive `dream` and `play`, both flag spellings work, checkpoints survive kills
and corruption, envs refuse use after close. Tiny models and files made here; no shipped bundle."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from worldsim.cli import app
from tiny_world import save_tiny_agent, save_tiny_bundle, save_tiny_dataset, save_tiny_run

torch.set_num_threads(1)  # tiny models on a shared 2-core box


def one_line_error(result, *needles: str) -> str:
    """The single `error: ...` line of a failed command; no traceback, nothing else on stderr."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return save_tiny_run(tmp_path_factory.mktemp("first-hour"))


@pytest.fixture
def datasets(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    return tmp_path / "datasets"


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def pickle_into(file: Path) -> None:
    torch.save({"weight": torch.zeros(3)}, file)  # a torch pickle under a .safetensors name


# ------------------------------------------------------------------------------ CLI: one line
def test_dream_bad_flags_and_paths_end_in_one_line(run, datasets, tmp_path):
    one_line_error(invoke("dream", "--checkpoint", "/nonexistent"), "--checkpoint /nonexistent", "no such file")
    one_line_error(invoke("dream", "--checkpoint", str(run), "--context", "worldsim/typo-v0"),
                   "--context worldsim/typo-v0", "unknown dataset id")
    one_line_error(invoke("dream", "--checkpoint", str(run), "--policy", "nothere.zip"), "--policy nothere.zip")
    one_line_error(invoke("dream", "--checkpoint", str(run), "--policy", "nothere/agent"), "--policy nothere/agent")
    one_line_error(invoke("dream", "--checkpoint", str(run), "--steps", "-5"), "--steps must be >= 1, got -5")
    one_line_error(invoke("dream", "--stepz", "3"), "No such option: --stepz", "worldsim dream --help")
    assert not list(tmp_path.glob("*.mp4"))


def test_plan_train_and_collect_bad_values_end_in_one_line(datasets, tmp_path):
    assert one_line_error(invoke("plan", "--checkpoint", "/nonexistent"), "--checkpoint /nonexistent")
    one_line_error(invoke("train", "-d", "x", "--codec", "y", "--run-dir", str(tmp_path / "r"), "--set", "n_layers=abc"),
                   "--set", "n_layers must be int")
    one_line_error(invoke("train", "-d", "x", "--codec", "y", "--run-dir", str(tmp_path / "r"), "--set", "n_layerz=2"),
                   "unknown model config field 'n_layerz'")
    line = one_line_error(invoke("collect", "-d", "badname", "--root", str(tmp_path)), "invalid dataset id 'badname'")
    assert "int()" not in line and "NoneType" not in line
    assert not (tmp_path / "r").exists() and not (tmp_path / "badname").exists()


def test_a_corrupt_checkpoint_given_to_dream_is_named_in_one_line(run, tmp_path):
    import shutil

    broken = tmp_path / "broken-run"
    shutil.copytree(run.parent, broken)
    ema = next((broken / "run").glob("checkpoints/step_*/ema.safetensors"))
    truncate(ema)
    one_line_error(invoke("dream", "--checkpoint", str(broken / "run"), "--policy", "nothere.zip"), "--policy")
    one_line_error(invoke("dream", "--checkpoint", str(broken / "run"), "--steps", "1", "--out", str(tmp_path / "a.gif")),
                   str(ema), "truncated")
    one_line_error(invoke("plan", "--checkpoint", str(broken / "run"), "--device", "cpu"), str(ema))

    sidecar = next((broken / "run").glob("checkpoints/step_*/checkpoint.json"))
    sidecar.write_text("[1, 2]")  # a header that is JSON but not an object
    one_line_error(invoke("dream", "--checkpoint", str(broken / "run"), "--steps", "1", "--out", str(tmp_path / "b.gif")),
                   str(sidecar), "a JSON list")
    sidecar.write_bytes(b"\x80\x04\x95")  # not UTF-8 (a pickle)
    one_line_error(invoke("dream", "--checkpoint", str(sidecar.parent), "--steps", "1", "--out", str(tmp_path / "c.gif")),
                   str(sidecar), "not UTF-8")


# ------------------------------------------------------------------------------ broken files
@pytest.mark.parametrize("damage", [truncate, pickle_into])
def test_every_safetensors_loader_names_the_broken_file(run, tmp_path, damage):
    import shutil

    from worldsim import bundled
    from worldsim.agents.agent_checkpoint import resolve_agent
    from worldsim.agents.agent_eval import load_agent
    from worldsim.codec.checkpoint import CheckpointError as CodecError, load_codec
    from worldsim.train.checkpoint import CheckpointError, load_world_model

    root = tmp_path / "copy"
    shutil.copytree(run.parent, root)
    model_file = next((root / "run").glob("checkpoints/step_*/ema.safetensors"))
    damage(model_file)
    with pytest.raises(CheckpointError, match="unreadable safetensors file") as e:
        load_world_model(model_file.parent)
    assert str(model_file) in str(e.value) and "\n" not in str(e.value)

    damage(root / "codec" / "codec.safetensors")
    with pytest.raises(CodecError, match="unreadable safetensors file") as e:
        load_codec(root / "codec")
    assert str(root / "codec" / "codec.safetensors") in str(e.value)

    agent_dir = resolve_agent(save_tiny_agent(tmp_path / "agent"))
    damage(agent_dir / "policy.safetensors")
    with pytest.raises(CheckpointError, match="unreadable safetensors file") as e:
        load_agent(agent_dir)
    assert str(agent_dir / "policy.safetensors") in str(e.value)

    bundle = save_tiny_bundle(tmp_path / "bundle")
    damage(bundle / "codec.safetensors")
    with pytest.raises(bundled.BundleError, match="unreadable safetensors file") as e:
        bundled.load_bundle_codec(bundle)
    assert str(bundle / "codec.safetensors") in str(e.value)


def test_a_bundle_manifest_without_files_is_refused_by_name(tmp_path, monkeypatch):
    from worldsim import bundled

    bundle = save_tiny_bundle(tmp_path / "bundle")
    manifest = json.loads((bundle / "model.json").read_text())
    del manifest["files"]
    (bundle / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(bundled.BundleError, match=r"model\.json: corrupt manifest: no \"files\" table"):
        bundled.load_bundle(bundle)
    monkeypatch.setenv(bundled.ENV_VAR, str(bundle))
    one_line_error(invoke("dream", "--steps", "1"), "corrupt manifest")


# ------------------------------------------------------------------------------ checkpoints
def _save_tiny_steps(run_dir: Path, steps: list[int]):
    from tiny_world import tiny_parts
    from worldsim.train.checkpoint import save_checkpoint
    from worldsim.train.ema import EMA

    model, codec = tiny_parts(0)
    for step in steps:
        save_checkpoint(run_dir, step=step, model=model, model_config=model.cfg.to_dict(),
                        optimizer=torch.optim.AdamW(model.parameters()), ema=EMA(model),
                        extra={"codec": {"path": "unused"}, "sigma_data": 1.0})


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_resume_falls_back_to_the_last_complete_checkpoint_with_a_warning(tmp_path, caplog):
    from worldsim.train import checkpoint as ckpt

    run_dir = tmp_path / "run"
    _save_tiny_steps(run_dir, [1, 2])
    newest = run_dir / "checkpoints" / "step_000002"
    assert ckpt.latest_checkpoint(run_dir) == newest
    truncate(newest / "trainer.safetensors")  # what --resume reads: optimizer moments and RNG states
    with caplog.at_level(logging.WARNING, logger="worldsim.train.checkpoint"):
        assert ckpt.latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step_000001"
    assert "skipping" in caplog.text and str(newest) in caplog.text and "truncated" in caplog.text
    model, sidecar = ckpt.load_world_model(run_dir)  # a run folder resolves to the fallback too
    assert sidecar["step"] == 1
    (run_dir / "latest.json").write_text("{broken")  # a torn pointer falls back as well
    assert ckpt.latest_checkpoint(run_dir).name == "step_000001"
    truncate(run_dir / "checkpoints" / "step_000001" / "ema.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="no other complete checkpoint"):
        ckpt.latest_checkpoint(run_dir)


def test_agent_resume_falls_back_too(tmp_path, caplog):
    from worldsim.agents.agent_checkpoint import latest_agent, read_agent_meta, save_agent

    run_dir = save_tiny_agent(tmp_path / "agent")
    first = latest_agent(run_dir)
    meta = read_agent_meta(first)
    newer = save_agent(run_dir, policy=torch.nn.Linear(2, 2), optimizer=None, meta=meta, num_timesteps=16)
    assert latest_agent(run_dir) == newer
    pickle_into(newer / "policy.safetensors")
    with caplog.at_level(logging.WARNING):
        assert latest_agent(run_dir) == first
    assert str(newer) in caplog.text


def test_a_save_removes_temp_folders_of_killed_writers(tmp_path):
    from worldsim.agents.agent_checkpoint import save_agent

    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    dead, alive = _dead_pid(), os.getppid()
    stale = [root / f".step_000003.tmp-{dead}", root / f".step_000001.old-{dead}"]
    live = root / f".step_000004.tmp-{alive}"  # a writer still running: not ours to delete
    for folder in (*stale, live):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"partial")
    _save_tiny_steps(run_dir, [5])
    assert not any(p.exists() for p in stale) and live.exists()
    assert (root / "step_000005" / "checkpoint.json").is_file()

    agent_root = tmp_path / "agent" / "checkpoints"
    (agent_root / f".step_000009.tmp-{dead}").mkdir(parents=True)
    save_agent(tmp_path / "agent", policy=torch.nn.Linear(2, 2), optimizer=None, meta={}, num_timesteps=10)
    assert [p.name for p in agent_root.iterdir()] == ["step_000010"]


# ------------------------------------------------------------------------------ agents drive dream and play
def test_an_agent_checkpoint_drives_dream_and_play(run, tmp_path, datasets):
    agent = save_tiny_agent(tmp_path / "agent")
    data = save_tiny_dataset(datasets)
    out = tmp_path / "d.gif"
    result = invoke("dream", "--checkpoint", str(run), "--context", str(data), "--policy", str(agent),
                    "--steps", "2", "--sampler-steps", "1", "--scale", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.is_file() and "wrote" in result.output

    wrong = save_tiny_agent(tmp_path / "agent-4", n_actions=4)  # trained on another action space
    one_line_error(invoke("dream", "--checkpoint", str(run), "--context", str(data), "--policy", str(wrong),
                          "--steps", "1", "--out", str(tmp_path / "e.gif")), "Discrete(4)", "Discrete(6)")

    from worldsim.commands.play import _load_agent_policy

    policy = _load_agent_policy(agent, 6, load_sb3_policy=None)
    assert policy(np.zeros((64, 64, 3), np.uint8)) in range(6)
    record = tmp_path / "play.gif"
    result = invoke("play", "--checkpoint", str(run), "--dataset", str(data), "--agent", str(agent), "--no-real",
                    "--record", str(record), "--max-frames", "2", "--fps", "0", "--scale", "1", "--sampler-steps", "1")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output and record.is_file()


# ------------------------------------------------------------------------------ flags, metadata, envs
def test_both_spellings_of_the_env_flag_work(tmp_path):
    line = one_line_error(invoke("collect", "--env", "worldsim/NoSuch-v0", "--root", str(tmp_path)), "NoSuch")
    assert "unknown env id 'worldsim/NoSuch-v0'" in line  # the hidden alias reached the config
    one_line_error(invoke("agent", "train", "--run-dir", str(tmp_path / "a"), "--env-id", "worldsim/NoSuch-v0"),
                   "unknown env 'worldsim/NoSuch-v0'")
    one_line_error(invoke("agent", "eval", str(tmp_path / "none"), "--env-id", "worldsim/NoSuch-v0"))
    one_line_error(invoke("collect", "--env", "worldsim/Crafter-v0", "--env-id", "worldsim/MemoryMaze-11x11-v0",
                          "--root", str(tmp_path)), "name the same option")
    assert "--env " not in invoke("collect", "--help").output.replace("--env-id", "")
    assert "--env-id" not in invoke("agent", "train", "--help").output


def test_version_and_dataset_provenance(tmp_path, monkeypatch):
    import importlib.metadata

    import worldsim
    from worldsim.data.minari_writer import dataset_requirements

    assert worldsim.__version__ == importlib.metadata.version("worldsim")
    assert dataset_requirements()[0] == f"worldsim=={worldsim.__version__}"
    monkeypatch.setenv("WORLDSIM_CODE_PERMALINK", "https://example.org/worldsim/tree/abc123")
    path = save_tiny_dataset(tmp_path)
    meta = json.loads((path / "data" / "metadata.json").read_text())
    assert meta["code_permalink"] == "https://example.org/worldsim/tree/abc123"
    assert meta["requirements"] == dataset_requirements()


def test_crafter_refuses_use_after_close():
    from worldsim.envs.crafter import CrafterEnv

    env = CrafterEnv()
    with pytest.raises(ValueError, match=r"takes no options, got \['x'\]"):
        env.reset(seed=0, options={"x": 1})
    env.reset(seed=0)
    env.close()
    for call in (lambda: env.step(0), lambda: env.reset(seed=0)):
        with pytest.raises(RuntimeError, match="CrafterEnv is closed"):
            call()


def test_gymnasium_video_and_resize_wrappers_work_out_of_the_box(tmp_path):
    """RecordVideo needs moviepy, ResizeObservation cv2: both are dependencies (gymnasium[other]'s)."""
    import gymnasium as gym

    import worldsim.envs  # noqa: F401

    env = gym.wrappers.RecordVideo(gym.make("worldsim/Crafter-v0", render_mode="rgb_array", max_episode_steps=4),
                                   str(tmp_path / "videos"), disable_logger=True)
    env.reset(seed=0)
    while not any(env.step(0)[2:4]):
        pass
    env.close()
    assert [p.name for p in (tmp_path / "videos").iterdir()] == ["rl-video-episode-0.mp4"]
    small = gym.wrappers.ResizeObservation(gym.make("worldsim/Crafter-v0"), (32, 32))
    assert small.reset(seed=0)[0].shape == (32, 32, 3)
    small.close()


# ------------------------------------------------------------------------------ silent corruption
def flip_middle_byte(file: Path) -> None:
    """One byte in the middle of the file (inside the tensor data) inverted: safetensors loads it."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def test_a_flipped_byte_in_any_checkpoints_weights_is_refused_by_name(run, tmp_path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from worldsim.agents.agent_checkpoint import resolve_agent
    from worldsim.agents.agent_eval import load_agent
    from worldsim.codec.checkpoint import CheckpointError as CodecError, load_codec
    from worldsim.train.checkpoint import CheckpointError, load_checkpoint, load_world_model, read_sidecar
    from worldsim.train.ema import EMA
    from tiny_world import tiny_model

    root = tmp_path / "copy"
    shutil.copytree(run.parent, root)
    folder = next((root / "run").glob("checkpoints/step_*"))
    ema_file = folder / "ema.safetensors"
    assert set(read_sidecar(folder)["sha256"]) == {"model.safetensors", "ema.safetensors", "trainer.safetensors"}
    load_world_model(folder)  # intact: loads
    flip_middle_byte(ema_file)
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_world_model(folder)
    assert str(ema_file) in str(e.value) and "\n" not in str(e.value)
    model = tiny_model()
    with pytest.raises(CheckpointError, match="corrupt") as e:  # resuming training checks it too
        load_checkpoint(folder, model=model, model_config=model.cfg.to_dict(), ema=EMA(model))
    assert str(ema_file) in str(e.value)
    load_world_model(folder, weights="model")  # the other files are fine
    one_line_error(invoke("dream", "--checkpoint", str(root / "run"), "--steps", "1", "--out", str(tmp_path / "a.gif")),
                   str(ema_file), "corrupt")

    # A checkpoint written before hashes were recorded still loads (nothing to check it against).
    sidecar = json.loads((folder / "checkpoint.json").read_text())
    del sidecar["sha256"]
    (folder / "checkpoint.json").write_text(json.dumps(sidecar))
    load_world_model(folder)

    # A copy re-stored in float16 on purpose (gpu_job's export marks it "stored_dtype") keeps the
    # sidecar, whose hash is of the float32 file: it loads.
    sidecar["sha256"] = read_sidecar(run / "checkpoints" / folder.name)["sha256"]
    (folder / "checkpoint.json").write_text(json.dumps(sidecar))
    with safe_open(str(run / "checkpoints" / folder.name / "ema.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: t.half() if t.is_floating_point() else t for k, t in tensors.items()}, str(ema_file),
              metadata={**meta, "stored_dtype": "float16"})
    load_world_model(folder)

    codec_file = root / "codec" / "codec.safetensors"
    load_codec(root / "codec")
    flip_middle_byte(codec_file)
    with pytest.raises(CodecError, match="corrupt") as e:
        load_codec(root / "codec")
    assert str(codec_file) in str(e.value)

    agent_dir = resolve_agent(save_tiny_agent(tmp_path / "agent"))
    load_agent(agent_dir)
    flip_middle_byte(agent_dir / "policy.safetensors")
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_agent(agent_dir)
    assert str(agent_dir / "policy.safetensors") in str(e.value)


# ------------------------------------------------------------------------------ one spelling for one thing
def test_device_defaults_to_auto_in_every_command():
    import re

    for command in (["play"], ["agent", "eval"], ["agent", "train"], ["dream"], ["plan"], ["eval", "prediction"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0, result.output
        text = re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m", "", result.output)).replace("│", "")
        assert re.search(r"--device [^\[]*\[default: auto\]", text), (command, text)


def test_agent_eval_runs_with_the_auto_device(tmp_path):
    agent = save_tiny_agent(tmp_path / "agent")
    result = invoke("agent", "eval", str(agent), "--episodes", "1", "--max-steps", "3", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])  # the comparison, on cpu or cuda


def test_dataset_is_accepted_wherever_a_dataset_id_is_taken(datasets, tmp_path):
    # collect: --dataset reaches the same check as --dataset-id / -d
    one_line_error(invoke("collect", "--dataset", "badname", "--root", str(tmp_path)), "invalid dataset id 'badname'")
    one_line_error(invoke("collect", "-d", "a/b-v0", "--dataset", "c/d-v0", "--root", str(tmp_path)),
                   "--dataset-id", "--dataset")  # two different values: refused, not one silently dropped
    # ingest: --dataset-id is still required, spelt either way
    one_line_error(invoke("ingest", "--source", "teco", "--input-dir", str(tmp_path)), "--dataset-id")
    missing_dir = tmp_path / "no-recordings"
    for flag in ("--dataset", "--dataset-id", "-d"):
        line = one_line_error(invoke("ingest", "--source", "teco", "--input-dir", str(missing_dir), flag, "worldsim/x-v0"))
        assert "--dataset-id" not in line, line  # past the dataset check: the input folder is what fails
    # dream: --dataset is the dataset context
    one_line_error(invoke("dream", "--checkpoint", "nothere", "--dataset", str(tmp_path / "none")), "--checkpoint")
    # the aliases stay out of the help
    for command in (["collect"], ["ingest"], ["dream"]):
        assert "--dataset " not in invoke(*command, "--help").output.replace("--dataset-id", "")


def test_help_stays_fast_and_torch_free():
    import time

    for command in (["collect"], ["ingest"], ["dream"], ["play"], ["agent", "eval"]):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", "import sys; from worldsim.cli import app; "
                               f"sys.argv = ['worldsim', *{command!r}, '--help']\ntry:\n    app()\nexcept SystemExit:\n    pass\n"
                               "assert 'torch' not in sys.modules, 'torch imported'"],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr
        assert "--help" in done.stdout and time.perf_counter() - start < 10


def test_train_codec_takes_dataset_and_run_dir_spellings_too(tmp_path):
    import gymnasium as gym

    from worldsim.codec.checkpoint import load_codec
    from worldsim.data.minari_writer import DatasetWriter, Episode

    rng = np.random.default_rng(0)
    writer = DatasetWriter("test/codec-alias-v0", gym.spaces.Box(0, 255, (64, 64, 3), np.uint8), gym.spaces.Discrete(6),
                           root=tmp_path / "datasets")
    no = np.zeros(5, bool)
    for _ in range(2):  # one to train on, one held out
        writer.append(Episode(rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8), rng.integers(0, 6, 5),
                              np.zeros(5), no, no))
    common = ["train-codec", "--preset", "tiny", "--steps", "1", "--batch-size", "2", "--eval-every", "1",
              "--no-progress", "--device", "cpu"]
    result = invoke(*common, "-d", str(writer.path), "--run-dir", str(tmp_path / "run"))  # as `worldsim train` spells them
    assert result.exit_code == 0, result.output
    assert "step 1: held-out PSNR" in result.output and load_codec(tmp_path / "run") is not None
    one_line_error(invoke(*common, "--out", str(tmp_path / "x")), "DATASETS")
    one_line_error(invoke(*common, str(writer.path)), "--out")
    one_line_error(invoke(*common, str(writer.path), "--out", str(tmp_path / "a"), "--run-dir", str(tmp_path / "b")),
                   "--out", "--run-dir")
