"""The GPU training job (worldsim.train.gpu_job, scripts/device/train_gpu.sh) dry-run on the CPU.

The slow test runs the very entry the lent GPU machine runs, `bash scripts/device/train_gpu.sh`,
on a pack of 2 real Memory Maze episodes, warm-starting a tiny bundle, with gymnasium, minari,
mujoco, pygame and SB3 blocked from being imported (the GPU machine has none of them): the
self-check passes, checkpoints and results.json come back within the lent machine's limits, and
the checkpoint loads. scripts/device/bring_back.py then turns it into a bundle and keeps or
replaces the bundle by its held-out PSNR. The fast tests check the pieces alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from worldsim.train import gpu_job

REPO = Path(__file__).resolve().parents[1]
try:
    import cv2  # noqa: F401  (the GPU machine decodes the pack with it; without it the job uses imageio-ffmpeg)

    _VIDEO = ("imageio_ffmpeg",)
except ImportError:
    _VIDEO = ()
# What the GPU machine lacks: the job's own list, plus packages that are installed here only.
BLOCKED = (*gpu_job.FORBIDDEN_MODULES, "PIL", "matplotlib", "imageio", "crafter", *_VIDEO)
BLOCKER = f"""\
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # `import name` (and of its submodules) now raises ImportError
sys.stderr.write("import blocker active\\n")
"""


def blocked_env(tmp_path: Path) -> dict[str, str]:
    """Environment whose Python processes cannot import what the GPU machine lacks (sitecustomize)."""
    folder = tmp_path / "blocker"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": str(folder), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHON": sys.executable}


# ------------------------------------------------------------------------------ fast
def test_the_job_path_imports_nothing_the_gpu_machine_lacks(tmp_path):
    code = (
        "import importlib, sys\n"
        "try:\n    import gymnasium\nexcept ImportError:\n    pass\nelse:\n    sys.exit('blocker not active')\n"
        "from worldsim.train import gpu_job\n"
        "for m in ('worldsim.data.pack', 'worldsim.bundled', 'worldsim.rollout.session', 'worldsim.model.loss',\n"
        "          'worldsim.train.checkpoint', 'worldsim.train.distributed', 'worldsim.codec.checkpoint'):\n"
        "    importlib.import_module(m)\n"
        "gpu_job.parse_args(['--pack', 'x', '--out', 'y'])\n"
        "print('loaded', gpu_job.forbidden_modules_loaded())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=blocked_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "import blocker active" in done.stderr and "loaded []" in done.stdout


def test_warm_start_through_the_job_keeps_the_direct_path_new():
    """The job and the trainer share `worldsim.train.weights`; the job wraps its errors as input errors."""
    from worldsim.model.config import make_config
    from worldsim.model.world_model import WorldModel
    from worldsim.codec import checkpoint as codec_checkpoint
    from worldsim.train import trainer, weights

    assert trainer.warm_start is weights.warm_start and gpu_job.codec_fingerprint is codec_checkpoint.codec_fingerprint
    model = WorldModel(make_config("tiny", latent_channels=4, prev_frames=2))
    source = WorldModel(make_config("tiny", latent_channels=4))
    report = gpu_job.warm_start(model, source)
    assert report["new"] == ["precond.net.prev_in.bias", "precond.net.prev_in.weight"]
    assert torch.equal(model.state_dict()["precond.net.pos"], source.state_dict()["precond.net.pos"])
    with pytest.raises(gpu_job.JobInputError, match="d_model"):
        gpu_job.warm_start(WorldModel(make_config("tiny", latent_channels=4, d_model=64)), source)


def test_kernel_self_checks_pass_on_the_cpu():
    checks = gpu_job.kernel_checks(torch.device("cpu"))
    assert [c.name for c in checks] == ["ssd_scan", "frame_attention", "parallel_vs_streaming"]
    assert all(c.ok and c.error <= c.tol for c in checks), checks
    gpu_job.raise_if_failed(checks)


def test_a_failed_check_stops_the_job_naming_it(monkeypatch):
    def broken(device):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(gpu_job, "check_ssd", broken)
    checks = gpu_job.kernel_checks(torch.device("cpu"))
    assert not checks[0].ok and "kernel exploded" in checks[0].message
    wrong = gpu_job.Check("frame_attention", False, error=0.5, tol=1e-5)
    with pytest.raises(gpu_job.SelfCheckFailed, match=r"ssd_scan: RuntimeError: kernel exploded; "
                                                       r"frame_attention: max relative error 0\.5 > tolerance 1e-05"):
        gpu_job.raise_if_failed([checks[0], wrong, *checks[1:]])


def test_a_bad_pack_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "pack").mkdir()
    code = gpu_job.main(["--pack", str(tmp_path / "pack"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2
    results = json.loads((tmp_path / "out" / gpu_job.RESULTS_FILE).read_text())
    assert results["status"] == "bad input" and "not a pack (no manifest.json)" in results["error"]
    assert "GPU JOB BAD INPUT" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the dry run
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """A tiny real dataset, codec, bundle and pack; then the job's entry run on them (blocked imports)."""
    from typer.testing import CliRunner

    from worldsim import bundled
    from worldsim.cli import app
    from worldsim.codec.autoencoder import CodecConfig
    from worldsim.codec.checkpoint import load_codec
    from worldsim.codec.train import CodecTrainConfig, train_codec
    from worldsim.collect import CollectConfig, collect
    from worldsim.model.config import make_config
    from worldsim.model.world_model import WorldModel

    root = tmp_path_factory.mktemp("gpu-job")
    torch.set_num_threads(1)
    collect(CollectConfig(
        env_id="worldsim/MemoryMaze-9x9-v0", policy="random", episodes=2, workers=2, max_steps=40,
        seed=3, dataset_id="test/maze-gpu-v0", root=str(root / "data"), progress=False,
    ))  # fmt: skip
    dataset = str(root / "data" / "test" / "maze-gpu-v0")
    codec_run = train_codec(CodecTrainConfig(
        datasets=(dataset,), run_dir=str(root / "codec"), steps=4, batch_size=8, lr=3e-3, warmup_steps=1,
        codec=CodecConfig(channels=(8, 16, 16, 16), latent_channels=4, norm_groups=4),
        val_frames=8, stats_frames=32, eval_every=4, checkpoint_every=4, progress=False,
    ))  # fmt: skip
    codec = load_codec(codec_run.checkpoint)
    torch.manual_seed(0)
    model = WorldModel(make_config("tiny", latent_channels=4, n_actions=6))
    clips, sources = bundled.sample_clips(dataset, 2, 9)
    bundle = root / "bundle"
    bundled.write_bundle(bundle, model=model, codec=codec, clips=clips, clip_sources=sources)

    packed = CliRunner().invoke(app, ["pack", dataset, "--out", str(root / "pack"), "--no-progress"])
    assert packed.exit_code == 0, packed.output

    out = root / "out"
    env = {**blocked_env(root), "OUT": str(out), "PACK": str(root / "pack")}
    # A step budget, not the clock, ends the run, so a loaded machine still passes step 20, where the
    # steady throughput starts (with --minutes 0.4 alone a busy CI host stopped short of it).
    args = ["--device", "cpu", "--minutes", "2", "--max-steps", "30", "--init-from", str(bundle), "--window", "8",
            "--batch-size", "4", "--val-episodes", "1", "--checkpoint-seconds", "1", "--bench-seconds", "5",
            "--bench-batches", "1,4", "--bench-steps", "2", "--threads", "1"]  # fmt: skip
    done = subprocess.run(["bash", "scripts/device/train_gpu.sh", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    return {"root": root, "dataset": dataset, "bundle": bundle, "codec": codec, "out": out, "done": done}


@pytest.mark.slow
def test_the_gpu_job_dry_run_on_the_cpu(dry_run):
    from worldsim import bundled
    from worldsim.train import trainer
    from worldsim.train.checkpoint import load_world_model

    done, out = dry_run["done"], dry_run["out"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "import blocker active" in done.stderr and "GPU JOB DONE on cpu" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "done" and results["forbidden_modules_loaded"] == []

    check = results["self_check"]
    assert check["passed"] and [c["name"] for c in check["checks"]] == [
        "ssd_scan", "frame_attention", "parallel_vs_streaming", "pack_video", "train_step"]
    assert all(c["ok"] for c in check["checks"])

    train = results["train"]
    assert train["steps"] == 30 and train["tokens_per_s"] > 0 and train["steady_tokens_per_s"] > 0
    assert train["mfu"] is None and train["parameters"] == results["model"]["parameters"]
    assert all(np.isfinite(row[2]) for row in train["loss_curve"])
    assert len(train["checkpoints"]) >= 2 and train["checkpoints"][-1]["why"] == "final"
    assert train["val_curve"][0][0] == 0 and all(v[2] is not None for v in train["val_curve"])
    assert results["model"]["warm_start"]["new"] == ["precond.net.prev_in.bias", "precond.net.prev_in.weight"]
    chunk = train["ssm_chunk"]  # timed on the device: every candidate ran, the fastest was kept
    assert set(chunk["step_ms"]) == {str(c) for c in gpu_job.SSM_CHUNK_CANDIDATES}
    assert chunk["chosen"] in gpu_job.SSM_CHUNK_CANDIDATES
    assert chunk["step_ms"][str(chunk["chosen"])] == min(chunk["step_ms"].values())
    bench = results["bench"]
    assert [r["batch"] for r in bench["rows"]] == [1, 4] and all(r["frames_per_s"] > 0 for r in bench["rows"])
    assert bench["single_stream_latency_ms"] > 0
    assert results["data"]["train_episodes"] == 1 and results["data"]["val_episodes"] == 1

    # What comes back from the lent machine: at most 8 files, two folders deep, 16 MiB each.
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) <= 8 and all(len(f.relative_to(out).parts) <= 3 for f in files)
    assert all(f.stat().st_size < 16 * 2**20 for f in files)
    assert sorted(f.relative_to(out).as_posix() for f in files) == sorted([
        "results.json", "job.log", "latest.json", f"{results['checkpoint']}/checkpoint.json",
        f"{results['checkpoint']}/ema.safetensors"])

    model, sidecar = load_world_model(out)
    assert sidecar["step"] == train["steps"] and model.cfg.prev_frames == 2
    source_cfg = bundled.read_manifest(dry_run["bundle"])["model_config"]
    assert model.cfg.to_dict() == {**source_cfg, "prev_frames": 2}
    assert sidecar["codec"]["sha256"] == trainer.codec_fingerprint(dry_run["codec"])


@pytest.mark.slow
def test_bring_back_builds_a_bundle_and_keeps_the_better_one(dry_run, tmp_path):
    import shutil

    from worldsim import bundled

    assert dry_run["done"].returncode == 0
    bundle = tmp_path / "bundle"
    shutil.copytree(dry_run["bundle"], bundle)
    before = bundled.read_manifest(bundle)
    cmd = [sys.executable, "scripts/device/bring_back.py", str(dry_run["out"]), "--bundle", str(bundle),
           "--heldout", dry_run["dataset"], "--clips-dataset", dry_run["dataset"], "--work", str(tmp_path / "work"),
           "--context", "3", "--horizon", "4", "--starts-per-episode", "2"]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "CANDIDATE (from the GPU job)" in done.stdout and "CURRENT BUNDLE" in done.stdout
    assert "open-loop sharpness (share of real frames')" in done.stdout  # shown beside the PSNRs that decide
    new = json.loads((tmp_path / "work" / "eval-candidate.json").read_text())
    old = json.loads((tmp_path / "work" / "eval-current.json").read_text())
    better = all(new["psnr"][k]["mean"] > old["psnr"][k]["mean"] for k in ("teacher_forced", "open_loop"))
    after = bundled.read_manifest(bundle)
    if better:
        assert "REPLACED" in done.stdout
        assert after["model_config"]["prev_frames"] == 2 and "heldout_prediction" in after["metrics"]
        bundled.load_bundle(bundle)
    else:
        assert "KEPT" in done.stdout and after == before


@pytest.mark.slow
def test_the_memory_pair_trains_two_models_from_scratch_at_an_equal_budget(dry_run, tmp_path):
    """The memory comparison's call (issue 13, scripts/device/memory_pair.sh): the LSSVWM and the
    sliding-window baseline trained from scratch side by side for a fixed number of steps whatever
    the time left, the baseline widened to the LSSVWM's parameters, and each one's last checkpoint
    returned flat within the lent machine's limits."""
    from worldsim.train.checkpoint import load_world_model

    root, out = dry_run["root"], tmp_path / "out"
    env = {**blocked_env(root), "OUT": str(out), "PACK": str(root / "pack")}
    args = ["--device", "cpu", "--minutes", "0.5", "--preset", "tiny", "--max-steps", "3", "--window", "8",
            "--batch-size", "4", "--val-episodes", "1", "--bench-seconds", "5", "--bench-batches", "1",
            "--bench-steps", "2", "--threads", "1"]  # fmt: skip
    planned = ["--prev-frames", "0", "--min-sigma-after-prefix", "20"]  # the next memory lease's (docs/gpu.md)
    done = subprocess.run(["bash", "scripts/device/memory_pair.sh", *args, *planned], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert "UNEQUAL" not in done.stdout
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert len(files) <= 8 and all(f.count("/") == 1 for f in files), files
    params = {}
    for variant in ("lssvwm", "causal_window"):
        assert json.loads((out / variant / "results.json").read_text())["train"]["steps"] == 3
        model, sidecar = load_world_model(out / variant)
        assert model.cfg.variant == variant and sidecar["step"] == 3
        assert model.cfg.prev_frames == 0 and sidecar["train_config"]["min_sigma_after_prefix"] == 20
        params[variant] = model.num_parameters()
    assert model.cfg.ssm_blocks == () and model.cfg.mlp_ratio > 4.0  # widened: no SSM to spend them on
    assert abs(params["causal_window"] / params["lssvwm"] - 1) < 0.1, params

    # The pair goes on in a later lease: each model from its own checkpoint, the same sizes.
    more = tmp_path / "more"
    done = subprocess.run(["bash", "scripts/device/memory_pair.sh", *args, *planned, "--max-steps", "2"], cwd=REPO,
                          env={**env, "OUT": str(more), "CONTINUE": str(out)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    for variant in ("lssvwm", "causal_window"):
        model, sidecar = load_world_model(more / variant)
        assert model.cfg.variant == variant and sidecar["step"] == 2 and model.num_parameters() == params[variant]
        assert sidecar["train_config"]["init_from"] == str(out / variant)
    missing = subprocess.run(["bash", "scripts/device/memory_pair.sh", *args], cwd=REPO,
                             env={**env, "OUT": str(tmp_path / "none"), "CONTINUE": str(tmp_path / "nowhere")},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "has no lssvwm/checkpoint.json nor lssvwm/model.json" in missing.stdout

    refused = subprocess.run(["bash", "scripts/device/train_gpu.sh", *args[:4], "--init-from", str(dry_run["bundle"]),
                              "--variant", "causal_window"], cwd=REPO, env={**env, "OUT": str(tmp_path / "no")},
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "a variant is chosen when training from scratch" in refused.stdout + refused.stderr


def test_a_baseline_is_widened_to_the_parameters_it_is_compared_at():
    from worldsim.model.config import make_config
    from worldsim.model.world_model import parameter_count, widen_to_parameters

    reference = parameter_count(make_config("cpu", variant="lssvwm"))
    narrow = make_config("cpu", variant="causal_window")
    assert parameter_count(narrow) < 0.8 * reference
    wide = widen_to_parameters(narrow, reference)
    assert abs(parameter_count(wide) / reference - 1) < 0.02 and wide.mlp_ratio > narrow.mlp_ratio
    assert wide.attn_window == narrow.attn_window and wide.ssm_blocks == ()
    assert widen_to_parameters(make_config("cpu"), reference).mlp_ratio == make_config("cpu").mlp_ratio
    assert gpu_job.parse_args(["--pack", "p", "--out", "o", "--init-from", "none", "--equal-parameters"]).equal_parameters


def test_equal_parameters_is_refused_for_a_warm_start(capsys):
    with pytest.raises(SystemExit):
        gpu_job.parse_args(["--pack", "p", "--out", "o", "--equal-parameters"])
    assert "--equal-parameters needs --init-from none" in capsys.readouterr().err


def test_ssm_chunk_must_be_auto_or_a_length(capsys):
    assert gpu_job.parse_args(["--pack", "p", "--out", "o", "--ssm-chunk", "64"]).ssm_chunk == "64"
    with pytest.raises(SystemExit):
        gpu_job.parse_args(["--pack", "p", "--out", "o", "--ssm-chunk", "big"])
    assert "ssm_chunk must be 'auto' or a positive integer" in capsys.readouterr().err


def test_the_training_step_check_passes_a_sound_model_from_scratch_on_any_batch():
    # From scratch the denoiser's output layer is zero, so at step 0 only the reward / termination
    # heads send a gradient to the direct path; the check used to fail whenever its windows had no
    # clean prefix (1 in 4 at two windows). Every seed must pass.
    from worldsim.model.config import make_config
    from worldsim.model.world_model import WorldModel

    frames, window = 200, 8
    data = gpu_job.DeviceData(
        latents=torch.randn(frames, 4, 8, 8), actions=torch.randint(0, 6, (frames,)), rewards=torch.zeros(frames),
        terminations=torch.zeros(frames, dtype=torch.bool), train_starts=torch.arange(frames - window),
        val_starts=torch.arange(0), window=window, clip=(np.zeros((1, 64, 64, 3), np.uint8), np.zeros(0)), stats={})
    for seed in range(8):
        cfg = gpu_job.JobConfig(pack="p", out="o", batch_size=2, window=window, seed=seed, noised_direct=1.0,
                                min_sigma_after_prefix=2.0 * (seed % 2))  # the memory-training settings too
        assert gpu_job.forcing_config(cfg).min_sigma_after_prefix == 2.0 * (seed % 2)
        assert gpu_job.parse_args(["--pack", "p", "--out", "o", "--min-sigma-after-prefix", "2"]).min_sigma_after_prefix == 2.0
        torch.manual_seed(seed)
        model = WorldModel(make_config("tiny", latent_channels=4, latent_grid=(8, 8), n_actions=6, prev_frames=2))
        check, _ = gpu_job.check_train_step(model, data, torch.device("cpu"), cfg)
        assert check.ok, (seed, check.message)
        assert check.detail["prev_in_grad_norm"] > 0
