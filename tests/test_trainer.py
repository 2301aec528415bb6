"""World-model training on a real (tiny) Memory Maze dataset with a real (tiny) codec: the loss
falls, kill-and-resume reproduces an uninterrupted run, strict checkpoint loading, the NaN guard,
and DDP with torchrun on CPU (gloo, 2 processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from worldsim.codec.autoencoder import CodecConfig
from worldsim.codec.train import CodecTrainConfig, train_codec
from worldsim.collect import CollectConfig, collect
from worldsim.data.windows import WindowDataset
from worldsim.model.config import make_config
from worldsim.model.loss import world_model_loss
from worldsim.model.world_model import WorldModel
from worldsim.train import checkpoint as ckpt
from worldsim.train.ema import EMA
from worldsim.train.trainer import TrainConfig, TrainingDiverged, learning_rate_factor, parameter_groups, train

REPO = Path(__file__).resolve().parents[1]
# One intra-op thread everywhere: on a shared 2-core machine it is several times faster than two
# for these tiny tensors, and the subprocess runs must use the same count as the in-process
# reference for their losses to agree bit for bit.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ real data, real codec
@pytest.fixture(scope="module")
def maze(tmp_path_factory) -> tuple[str, str]:
    """(dataset folder, codec checkpoint): 2 Memory Maze episodes of 40 steps, a tiny codec trained briefly."""
    root = tmp_path_factory.mktemp("train")
    collect(CollectConfig(
        env_id="worldsim/MemoryMaze-9x9-v0", policy="random", episodes=2, workers=2, max_steps=40,
        seed=3, dataset_id="test/maze-train-v0", root=str(root / "data"), progress=False,
    ))  # fmt: skip
    dataset = str(root / "data" / "test" / "maze-train-v0")
    torch.set_num_threads(1)
    codec_cfg = CodecConfig(channels=(8, 16, 16, 16), latent_channels=4, norm_groups=4)  # 64x64 -> 4x8x8
    result = train_codec(CodecTrainConfig(
        datasets=(dataset,), run_dir=str(root / "codec"), codec=codec_cfg, steps=4, batch_size=8, lr=3e-3,
        warmup_steps=1, val_frames=8, stats_frames=32, eval_every=4, checkpoint_every=4, progress=False,
    ))  # fmt: skip
    return dataset, str(result.checkpoint)


def small_run(maze, run_dir: Path, **overrides) -> TrainConfig:
    dataset, codec = maze
    settings = dict(
        datasets=(dataset,), codec=codec, run_dir=str(run_dir), preset="tiny", window=8, batch_size=2,
        steps=24, lr=2e-3, warmup_steps=4, log_every=1, checkpoint_every=4, sample_every=12,
        sample_count=1, progress=False,
    )  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def reference(maze, tmp_path_factory):
    """An uninterrupted 24-step run: (config, summary)."""
    cfg = small_run(maze, tmp_path_factory.mktemp("reference") / "run")
    return cfg, train(cfg)


def tb_losses(run_dir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


def as_float32(losses):
    # TensorBoard stores float32; the summary keeps the Python float of a float32 tensor.
    return [(s, float(torch.tensor(v, dtype=torch.float32))) for s, v in losses]


def final_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{name}/{k}": v for name in ("model", "ema", "trainer") for k, v in load_file(folder / f"{name}.safetensors").items()}


# ------------------------------------------------------------------------------ overfitting
@pytest.mark.slow
def test_tiny_model_overfits_a_tiny_maze_dataset(maze, tmp_path):
    """100 steps of the tiny preset on 66 windows: the training loss falls >= 2.5x (measured 3.3x: the
    per-step loss is noisy, each batch draws its own noise levels) and the loss on a fixed batch
    with fixed noise >= 3x (measured 4.2x)."""
    cfg = small_run(maze, tmp_path / "run", batch_size=4, steps=100, lr=5e-3, warmup_steps=10, checkpoint_every=100,
                    sample_every=100, log_every=10, sample_count=2)  # fmt: skip
    summary = train(cfg)
    losses = [v for _, v in summary.losses]
    assert len(losses) == 100 and summary.step == 100
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    print(f"\nloss: first 10 steps {first:.3f}, last 20 steps {last:.3f} ({first / last:.1f}x), "
          f"{summary.steps_per_second:.1f} steps/s")  # fmt: skip
    assert first / last >= 2.5

    # The same on a fixed batch and fixed noise: the trained weights (raw and EMA) beat the initial ones.
    dataset = WindowDataset(cfg.datasets, window=cfg.window)
    items = [dataset[i] for i in range(0, len(dataset), 8)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("frames", "actions", "rewards", "terminations")}
    run_dir = Path(cfg.run_dir)
    model, sidecar = ckpt.load_world_model(run_dir, weights="model")
    ema_model, _ = ckpt.load_world_model(run_dir, weights="ema")
    from worldsim.codec.checkpoint import load_codec

    codec = load_codec(sidecar["codec"]["path"])
    torch.manual_seed(cfg.seed)
    initial = WorldModel(model.cfg).eval()  # the trainer's initial weights (same seed)

    def fixed_loss(m):
        with torch.no_grad():
            latents = codec.encode(batch["frames"])
            g = torch.Generator().manual_seed(123)
            return world_model_loss(m, latents, batch["actions"], batch["rewards"].float(), batch["terminations"], generator=g)[0].item()

    before, after, after_ema = fixed_loss(initial), fixed_loss(model), fixed_loss(ema_model)
    print(f"fixed-batch loss: initial {before:.3f}, trained {after:.3f}, EMA {after_ema:.3f}")
    assert before / after >= 3.0
    assert after_ema < before

    # Logs, samples and the checkpoint are where the run folder says.
    assert {s for s, _ in tb_losses(run_dir)} == set(range(10, 101, 10))
    assert (run_dir / "samples" / "step_000100.png").is_file()
    assert (run_dir / "samples" / "step_000100.gif").is_file()
    assert json.loads((run_dir / "latest.json").read_text())["step"] == 100


# ---------------------------------------------------------------------------- exact resume
def test_stop_and_resume_reproduces_the_uninterrupted_losses(maze, reference, tmp_path):
    ref_cfg, ref = reference
    run = tmp_path / "run"
    first = train(small_run(maze, run, stop_after=10))  # checkpoint at the stop (step 10)
    assert first.step == 10 and first.checkpoint.name == "step_000010"
    # A new config object, new model / optimizer / data objects: only the run folder carries over.
    second = train(small_run(maze, run, resume=True))
    assert [s for s, _ in second.losses] == list(range(11, 25))
    assert first.losses + second.losses == ref.losses  # bit-identical

    a, b = final_tensors(run / "checkpoints" / "step_000024"), final_tensors(ref.checkpoint)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches(maze, reference, tmp_path):
    """A real `python -m` run killed with SIGKILL between checkpoints, then resumed from the CLI."""
    _, ref = reference
    dataset, codec = maze
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "worldsim.commands.train", "--dataset", dataset, "--codec", codec,
        "--run-dir", str(run), "--window", "8", "--batch-size", "2", "--steps", "24", "--lr", "2e-3",
        "--warmup-steps", "4", "--log-every", "1", "--checkpoint-every", "4", "--sample-every", "12",
        "--no-progress",
    ]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    latest = run / "latest.json"
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["step"] >= 8:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(latest.read_text())["step"]
    assert 8 <= killed_at < 24

    done = subprocess.run([*command, "--resume"], cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step 24" in done.stdout
    # TensorBoard: the killed session's events past its last checkpoint were purged on resume.
    assert tb_losses(run) == as_float32(ref.losses)


# ------------------------------------------------------------------- strict checkpoint loads
def test_loading_into_a_mismatched_config_names_the_keys(reference, tmp_path):
    _, ref = reference
    folder = ref.checkpoint
    saved = ckpt.read_sidecar(folder)["model_config"]

    other = make_config("tiny", latent_channels=4, latent_grid=[8, 8], d_model=48, n_layers=3)
    model = WorldModel(other)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(folder, model=model, model_config=other.to_dict())
    message = str(e.value)
    assert "model config mismatch" in message
    assert "d_model: code has 48, checkpoint has 32" in message and "n_layers: code has 3, checkpoint has 2" in message

    # Config text that agrees but a module that does not: the tensors are named.
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(folder, model=model, model_config=saved)
    message = str(e.value)
    assert "do not fit the model" in message and "mis-shaped tensors" in message
    # The third layer exists only in the code's model.
    assert "missing tensors (in the code, not in the checkpoint) ['precond.net.blocks.2." in message
    assert "precond.net.patch_in.weight: code (48, 4), checkpoint (32, 4)" in message


def test_resume_with_other_settings_is_refused(maze, reference, tmp_path):
    ref_cfg, ref = reference
    run = tmp_path / "run"
    train(small_run(maze, run, stop_after=4, sample_every=0))
    with pytest.raises(FileExistsError, match="--resume"):
        train(small_run(maze, run))
    with pytest.raises(ckpt.CheckpointError, match=r"d_model: code has 48, checkpoint has 32"):
        train(small_run(maze, run, resume=True, model_overrides={"d_model": 48}))
    with pytest.raises(ckpt.CheckpointError, match=r"batch_size: run has 2, asked for 3"):
        train(small_run(maze, run, resume=True, batch_size=3))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(small_run(maze, tmp_path / "empty", resume=True))


def test_a_torn_checkpoint_folder_is_refused(reference, tmp_path):
    import shutil

    _, ref = reference
    run = Path(ref.checkpoint).parents[1]
    torn = tmp_path / "torn"
    shutil.copytree(ref.checkpoint, torn)
    shutil.copy(run / "checkpoints" / "step_000020" / "ema.safetensors", torn / "ema.safetensors")
    model, _ = ckpt.load_world_model(torn, weights="model")  # the intact files still load
    with pytest.raises(ckpt.CheckpointError, match="belongs to step 20.*torn"):
        ckpt.load_world_model(torn, weights="ema")
    # keep_checkpoints=3: only the newest three of the six written are on disk.
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000016", "step_000020", "step_000024"]


# ------------------------------------------------------------------------------- NaN guard
def test_nan_guard_stops_and_names_the_step_and_last_good_checkpoint(maze, tmp_path):
    run = tmp_path / "run"
    cfg = small_run(maze, run, lr=1e30, warmup_steps=1, checkpoint_every=1, steps=10, sample_every=0)
    with pytest.raises(TrainingDiverged) as e:
        train(cfg)
    message = str(e.value)
    latest = json.loads((run / "latest.json").read_text())
    bad_step = latest["step"] + 1
    assert "non-finite loss" in message or "non-finite gradient norm" in message
    assert f"at step {bad_step};" in message
    assert f"Last good checkpoint: {run / latest['checkpoint']}" in message
    assert bad_step <= 3  # an lr of 1e30 blows up within a step or two
    assert ckpt.list_checkpoints(run)[-1].name == f"step_{bad_step - 1:06d}"  # nothing written after


# ------------------------------------------------------------------------------- DDP (gloo)
def torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "worldsim.commands.train", *args]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(maze, tmp_path):
    dataset, codec = maze
    run = tmp_path / "ddp"
    common = ["--dataset", dataset, "--codec", codec, "--run-dir", str(run), "--window", "8", "--batch-size", "2",
              "--log-every", "1", "--sample-every", "0", "--no-progress"]  # fmt: skip
    done = torchrun([*common, "--steps", "4", "--checkpoint-every", "2"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "on 2 rank(s)" in done.stdout and done.stdout.count("step 4: loss") == 1  # rank 0 reports
    sidecar = ckpt.read_sidecar(run)
    assert sidecar["step"] == 4 and sidecar["world_size"] == 2
    assert len(sidecar["rng"]) == 2  # both ranks' RNG states, gathered by rank 0
    assert len(list((run / "tb").glob("events.*"))) == 1  # only rank 0 logs
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000002", "step_000004"]
    assert [s for s, _ in tb_losses(run)] == [1, 2, 3, 4]

    # A NaN stops both ranks at the same step (neither hangs in the next all-reduce).
    nan_run = tmp_path / "ddp-nan"
    nan_args = ["--dataset", dataset, "--codec", codec, "--run-dir", str(nan_run), "--window", "8",
                "--batch-size", "2", "--steps", "6", "--lr", "1e30", "--warmup-steps", "1", "--checkpoint-every", "1",
                "--sample-every", "0", "--no-progress"]  # fmt: skip
    bad = torchrun(nan_args)
    assert bad.returncode != 0
    stopped = [line for line in bad.stderr.splitlines() if line.startswith("training diverged")]
    assert len(stopped) == 2, bad.stderr  # one line per rank
    assert len({line.split(";")[0] for line in stopped}) == 1  # the same step on both


# -------------------------------------------------------------------------- small pieces
def test_ema_follows_the_weights_with_warmup():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # first update: decay min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.module.weight, 0.1 * start + 0.9 * model.weight)
    for _ in range(200):
        ema.update(model)
    assert ema.current_decay() == 0.9
    torch.testing.assert_close(ema.module.weight, model.weight)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_parameter_groups_and_schedule(maze):
    cfg = make_config("tiny", latent_channels=4, latent_grid=[8, 8])
    model = WorldModel(cfg)
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and not getattr(p, "_no_weight_decay", False) for p in decay["params"])
    assert all(p.ndim <= 1 or getattr(p, "_no_weight_decay", False) for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))

    run = small_run(maze, Path("unused"), steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [learning_rate_factor(run, s) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[100] == pytest.approx(0.1) and all(a >= b for a, b in zip(factors[9:], factors[10:]))


def test_continuous_actions_train_and_resume(maze, tmp_path):
    """Box actions (the Minecraft sources' encoding) take the continuous path end to end."""
    import gymnasium as gym
    import numpy as np

    from worldsim.data.minari_writer import DatasetWriter, Episode

    rng = np.random.default_rng(0)
    space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    writer = DatasetWriter("test/box-v0", gym.spaces.Box(0, 255, (64, 64, 3), np.uint8), space, root=tmp_path / "data")
    for n in (12, 12):
        no = np.zeros(n, bool)
        frames = rng.integers(0, 256, (n + 1, 64, 64, 3), dtype=np.uint8)
        actions = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
        writer.append(Episode(frames, actions, rng.normal(size=n), terminations=no, truncations=no))
    run = tmp_path / "run"
    box_data = (str(writer.path), maze[1])
    first = train(small_run(box_data, run, steps=4, stop_after=2, checkpoint_every=2, sample_every=2))
    second = train(small_run(box_data, run, steps=4, checkpoint_every=2, sample_every=2, resume=True))
    config = ckpt.read_sidecar(run)["model_config"]
    assert (config["action_kind"], config["action_dim"], config["n_actions"]) == ("continuous", 3, 0)
    assert second.step == 4 and all(np.isfinite(v) for _, v in first.losses + second.losses)
    assert (run / "samples" / "step_000004.png").is_file()


def test_bad_train_config_is_named(maze):
    with pytest.raises(ValueError, match="window must be >= 3"):
        small_run(maze, Path("x"), window=2).validate()
    with pytest.raises(ValueError, match="sample_context"):
        small_run(maze, Path("x"), sample_context=8).validate()
    with pytest.raises(ValueError, match="stop_after"):
        small_run(maze, Path("x"), stop_after=30).validate()
    with pytest.raises(ValueError, match="direct_noise must be a finite number >= 0"):
        small_run(maze, Path("x"), direct_noise=-0.1).validate()
    with pytest.raises(ValueError, match=r"own_context must be a probability in \[0, 1\]"):
        small_run(maze, Path("x"), own_context=1.5).validate()
    with pytest.raises(ValueError, match=r"model_overrides \['latent_channels'\] contradict"):
        train(small_run(maze, Path("x"), model_overrides={"latent_channels": 16}))


def test_warm_start_adds_the_direct_path_and_keeps_the_weights(maze, reference, tmp_path):
    """A new run with prev_frames=2 warm-started from the reference run: every tensor the source
    has is copied (EMA weights), the new path starts at zero; a different backbone is refused."""
    from worldsim.train.trainer import warm_start

    source_cfg, summary = reference
    source, _ = ckpt.load_world_model(summary.checkpoint)
    cfg = small_run(maze, tmp_path / "warm", steps=2, stop_after=1, sample_every=0,
                    model_overrides={"prev_frames": 2}, init_from=source_cfg.run_dir)
    train(cfg)
    sidecar = ckpt.read_sidecar(ckpt.latest_checkpoint(cfg.run_dir))
    assert sidecar["train_config"]["init_from"] == source_cfg.run_dir
    assert sidecar["model_config"]["prev_frames"] == 2

    target = WorldModel(source.cfg.__class__.from_dict({**source.cfg.to_dict(), "prev_frames": 2}))
    warm_start(target, source_cfg.run_dir)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    assert target.net.prev_in.weight.abs().sum() == 0
    wider = WorldModel(make_config("tiny", latent_channels=4, latent_grid=(8, 8), d_model=48))
    with pytest.raises(ckpt.CheckpointError, match="d_model"):
        warm_start(wider, source_cfg.run_dir)
