"""The bundled default model: built from a real (tiny) training checkpoint, codec and Minari
dataset into a temporary folder, loaded back, and used as the default of the dream env and CLIs.
Nothing here writes into the package: WORLDSIM_BUNDLE_DIR points at temporary folders."""

import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import worldsim.envs  # noqa: F401 - registers the dream ids
from worldsim import bundled
from worldsim.train.bundle_export import bundle_from_checkpoint
from worldsim.bundled import BundleError
from worldsim.codec.autoencoder import FrameCodec, preset
from worldsim.codec.checkpoint import save_codec
from worldsim.data.minari_writer import DatasetWriter, Episode
from worldsim.data.windows import WindowDataset
from worldsim.dream import NoModelError, resolve_checkpoint_arg
from worldsim.envs.dream import DreamEnv, make_dream_env
from worldsim.model.config import make_config
from worldsim.model.world_model import WorldModel
from worldsim.train.checkpoint import load_world_model, save_checkpoint
from worldsim.train.ema import EMA
from worldsim.train.trainer import codec_fingerprint

torch.set_num_threads(1)  # tiny models on a shared 2-core box: threads only add overhead
ROOT = Path(__file__).resolve().parents[1]
CLIP_FRAMES = 9  # = the tiny preset's attention window


def _open_gates(model: torch.nn.Module, std: float) -> None:
    with torch.no_grad():  # open the zero-initialised adaLN gates / heads so outputs depend on input
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, std)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A `worldsim train`-style run (EMA != raw weights, codec recorded with its sha256) and a
    Minari dataset of 64x64 frames with 6 discrete actions."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bundle")
    codec = FrameCodec(preset("tiny")).eval()
    codec_dir = save_codec(codec, root / "codec")
    cfg = make_config("tiny", latent_channels=4, latent_grid=(16, 16), patch=2)
    model = WorldModel(cfg)
    _open_gates(model, 0.05)
    ema = EMA(model)
    with torch.no_grad():  # the raw weights move on; the bundle must ship the EMA ones
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    codec_record = {"path": str(codec_dir), "config": codec.config.to_dict(), "sha256": codec_fingerprint(codec)}
    save_checkpoint(root / "run", step=7, model=model, model_config=cfg.to_dict(),
                    optimizer=torch.optim.AdamW(model.parameters()), ema=ema,
                    extra={"codec": codec_record, "sigma_data": 1.0,
                           "train_config": {"datasets": ["test/bundle-v0"], "preset": "tiny"}})

    writer = DatasetWriter("test/bundle-v0", gym.spaces.Box(0, 255, (64, 64, 3), np.uint8),
                           gym.spaces.Discrete(6), root=root / "datasets")
    rng = np.random.default_rng(0)
    for steps in (12, 15, 10):
        done = np.zeros(steps, bool)
        done[-1] = True
        writer.append(Episode(observations=rng.integers(0, 256, (steps + 1, 64, 64, 3), dtype=np.uint8),
                              actions=rng.integers(0, 6, steps), rewards=np.zeros(steps),
                              terminations=np.zeros(steps, bool), truncations=done))
    return {"root": root, "run": root / "run", "dataset": str(writer.path), "codec": codec, "codec_dir": codec_dir}


def _build(run, out, **kwargs):
    kwargs = {"dataset": run["dataset"], "clips": 4, "clip_frames": CLIP_FRAMES, **kwargs}
    return bundle_from_checkpoint(run["run"], out, **kwargs)


@pytest.fixture(scope="module")
def bundle32(run):
    return _build(run, run["root"] / "b32" / bundled.BUNDLE_NAME, dtype="float32")


@pytest.fixture(scope="module")
def bundle16(run):
    return _build(run, run["root"] / "b16" / bundled.BUNDLE_NAME, dtype="float16", metrics={"psnr": 21.5})


def _outputs(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 16, 16, generator=g)
    sigma = torch.tensor([[0.0, 0.5, 2.0], [1.0, 0.0, 0.3]])
    actions = torch.tensor([[6, 1, 2], [6, 5, 0]])  # index n_actions = "no action" for a first frame
    with torch.no_grad():
        out = model(x, sigma, actions)
    return out.denoised, out.reward, out.termination_logit


def test_float32_bundle_reproduces_the_ema_model_exactly(run, bundle32):
    ema_model, _ = load_world_model(run["run"], weights="ema")
    raw_model, _ = load_world_model(run["run"], weights="model")
    model, codec, clips = bundled.load_bundle(bundle32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for a, b in zip(_outputs(model), _outputs(ema_model)):
        assert torch.equal(a, b)
    assert not torch.allclose(_outputs(model)[0], _outputs(raw_model)[0])  # EMA shipped, not the raw weights
    assert all(torch.equal(v, codec.state_dict()[k]) for k, v in run["codec"].state_dict().items())


def test_float16_bundle_is_half_the_size_and_rounds_only(run, bundle16, bundle32):
    ema_model, _ = load_world_model(run["run"], weights="ema")
    model, _, _ = bundled.load_bundle(bundle16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    loaded = model.state_dict()
    for k, v in ema_model.state_dict().items():  # weights equal the float16-rounded originals, exactly
        assert torch.equal(loaded[k], v.half().float() if v.is_floating_point() else v), k
    for a, b in zip(_outputs(model), _outputs(ema_model)):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-2)
    size16 = (bundle16 / bundled.WEIGHTS_FILE).stat().st_size
    size32 = (bundle32 / bundled.WEIGHTS_FILE).stat().st_size
    assert size16 < 0.6 * size32


def test_clips_and_manifest_round_trip(run, bundle16):
    clips = bundled.load_bundle_clips(bundle16)
    manifest = bundled.read_manifest(bundle16)
    assert clips.frames.shape == (4, CLIP_FRAMES, 64, 64, 3) and clips.frames.dtype == np.uint8
    assert clips.actions.shape == (4, CLIP_FRAMES - 1) and clips.actions.dtype == np.int64
    windows = WindowDataset(run["dataset"], CLIP_FRAMES)
    sources = manifest["clips"]["sources"]
    assert len({s["episode"] for s in sources}) == 3  # all three episodes before any repeats
    for i, s in enumerate(sources):  # each clip is exactly the dataset window it names
        window = next(windows[j] for j in range(len(windows)) if windows.locate(j)[1:] == (s["episode"], s["start"]))
        assert np.array_equal(clips.frames[i], window["frames"].numpy())
        assert np.array_equal(clips.actions[i], window["actions"].numpy()[: CLIP_FRAMES - 1])
    windows.close()
    prov = manifest["provenance"]
    assert prov["step"] == 7 and prov["weights"] == "ema" and prov["training_datasets"] == ["test/bundle-v0"]
    assert prov["clip_dataset"] == run["dataset"] and prov["created"][:2] == "20"
    assert manifest["metrics"] == {"psnr": 21.5} and manifest["stored_dtype"] == "float16"
    assert manifest["maze_size"] == 9


def test_dream_env_runs_from_the_installed_bundle(bundle16, monkeypatch):
    monkeypatch.setenv(bundled.ENV_VAR, str(bundle16))
    assert bundled.bundled_model_dir() == bundle16
    clips = bundled.load_bundled().clips
    env = make_dream_env(context=clips.context(), context_frames=CLIP_FRAMES, horizon=3, sampler_steps=1)
    assert isinstance(env, DreamEnv)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    obs, reward, terminated, truncated, info = env.step(2)
    assert obs.shape == (64, 64, 3) and np.isfinite(reward)
    made = gym.make("worldsim/Dream-MemoryMaze-9x9-v0", context=clips.context(), context_frames=CLIP_FRAMES,
                    sampler_steps=1)
    made.reset(seed=1)
    made.step(0)
    assert resolve_checkpoint_arg(None) == bundle16
    with pytest.raises(ValueError, match="learned 9x9"):  # another maze size is not silently dreamed
        gym.make("worldsim/Dream-MemoryMaze-11x11-v0", context=clips.context())


def test_rebuild_replaces_the_bundle_in_place(run, tmp_path):
    out = tmp_path / bundled.BUNDLE_NAME
    _build(run, out, clips=2, dtype="float32")
    _build(run, out, clips=3, seed=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [bundled.BUNDLE_NAME]  # no temporary folders left
    assert sorted(p.name for p in out.iterdir()) == sorted([*bundled.read_manifest(out)["files"], bundled.MANIFEST_FILE])
    assert len(bundled.load_bundle_clips(out)) == 3 and bundled.read_manifest(out)["stored_dtype"] == "float16"


def test_rebuilding_writes_the_same_bytes_for_the_same_weights(run, tmp_path):
    # safetensors orders metadata by a hash map: without a fixed order an unchanged codec came out
    # as a new file (another 2.4 MiB in the history) at every re-bundle.
    a, b = tmp_path / "a" / bundled.BUNDLE_NAME, tmp_path / "b" / bundled.BUNDLE_NAME
    _build(run, a, clips=2)
    _build(run, b, clips=2)
    files_a, files_b = bundled.read_manifest(a)["files"], bundled.read_manifest(b)["files"]
    assert files_a == files_b and set(files_a) >= {"model.safetensors", "codec.safetensors"}


def test_corrupt_or_missing_files_are_named(bundle32, tmp_path):
    import shutil

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(bundle32, dst)
        return dst

    flipped = copy("flipped")
    data = bytearray((flipped / bundled.WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (flipped / bundled.WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.safetensors: corrupt"):
        bundled.load_bundle(flipped)
    missing = copy("missing")
    (missing / bundled.CLIPS_FILE).unlink()
    with pytest.raises(BundleError, match=r"clips\.safetensors: missing"):
        bundled.load_bundle(missing)
    bad_json = copy("bad-json")
    (bad_json / bundled.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="corrupt JSON"):
        bundled.load_bundle(bad_json)
    other = copy("other-format")
    (other / bundled.MANIFEST_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BundleError, match="not a model bundle"):
        bundled.load_bundle(other)


def test_wrong_codec_or_bad_arguments_are_refused(run, tmp_path):
    other = save_codec(FrameCodec(preset("tiny")).eval(), tmp_path / "other-codec")  # same config, other weights
    with pytest.raises(BundleError, match="not the codec"):
        _build(run, tmp_path / "x", codec=other)
    with pytest.raises(BundleError, match="dtype"):
        _build(run, tmp_path / "y", dtype="bfloat16")
    with pytest.raises(BundleError, match="windows"):
        _build(run, tmp_path / "z", clips=200)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_without_a_bundle_the_clear_errors_hold(tmp_path, monkeypatch):
    monkeypatch.delenv(bundled.ENV_VAR, raising=False)
    assert bundled.bundle_location() == bundled.PACKAGE_BUNDLE_DIR
    monkeypatch.setattr(bundled, "PACKAGE_BUNDLE_DIR", tmp_path / "empty-package-assets")
    assert bundled.bundled_model_dir() is None
    with pytest.raises(ValueError, match="checkpoint="):
        make_dream_env()
    with pytest.raises(NoModelError, match="worldsim train"):
        resolve_checkpoint_arg(None)
    with pytest.raises(FileNotFoundError, match="no bundled model"):
        bundled.load_bundled()
    from worldsim.commands.dream import dream as dream_command
    from worldsim.commands.play import play

    for command in (dream_command, play):
        app = typer.Typer()
        app.command()(command)
        result = CliRunner().invoke(app, [])
        assert result.exit_code == 2 and "--checkpoint" in result.output and "No bundled model" in result.output


@pytest.mark.slow
def test_script_writes_a_bundle_and_reports_its_size(run, tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"ssim": 0.5}))
    out = tmp_path / bundled.BUNDLE_NAME
    args = [sys.executable, str(ROOT / "scripts" / "bundle_model.py"), "--checkpoint", str(run["run"]),
            "--dataset", run["dataset"], "--clips", "2", "--clip-frames", "5", "--metrics", str(metrics), "--out", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "MiB in all" in done.stdout
    assert bundled.read_manifest(out)["metrics"] == {"ssim": 0.5}
    assert bundled.load_bundle_clips(out).frames.shape[:2] == (2, 5)
    metrics.write_text("[1, 2]")
    bad = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "JSON object" in bad.stderr


def test_the_shipped_bundle_loads_and_dreams(monkeypatch):
    """The model that ships inside the package: intact files, and a few dream steps from its clips."""
    from worldsim.bundled import PACKAGE_BUNDLE_DIR, is_bundle, load_bundled, read_manifest
    from worldsim.envs.dream import DreamEnv

    monkeypatch.delenv("WORLDSIM_BUNDLE_DIR", raising=False)
    if not is_bundle(PACKAGE_BUNDLE_DIR):
        pytest.skip(f"no bundled model in this checkout ({PACKAGE_BUNDLE_DIR})")
    torch.set_num_threads(1)
    bundle = load_bundled()  # checks every file's sha256
    assert read_manifest(PACKAGE_BUNDLE_DIR)["metrics"], "the shipped bundle records its measured metrics"
    env = DreamEnv(model=bundle.model, codec=bundle.codec, context=bundle.clips.context(),
                   context_frames=bundle.clips.frames.shape[1], horizon=8)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8 and np.isfinite(reward)


def test_the_shipped_memory_pair_is_an_equal_budget_comparison():
    """The memory comparison's two models (issue 13), shipped so `worldsim eval memory` reproduces
    the README's table offline and the next lease continues them (memory_pair.sh CONTINUE=): intact
    files, the variants they claim at parameters within 10%, trained alike, each under 10 MiB."""
    from worldsim.bundled import PACKAGE_BUNDLE_DIR, bundle_bytes, load_bundle_model, read_manifest

    pair = PACKAGE_BUNDLE_DIR.parent / "memory-pair-9x9"
    models, provenance = {}, {}
    for variant in ("lssvwm", "causal_window"):
        folder = pair / variant
        models[variant], _ = load_bundle_model(folder)  # checks every file's sha256
        manifest = read_manifest(folder)
        provenance[variant] = {k: manifest["provenance"][k] for k in ("step", "training_datasets", "window")}
        assert models[variant].cfg.variant == variant and bundle_bytes(folder) < 10 * 2**20
        assert manifest["metrics"]["training"]["steps"] == 2500 and manifest["metrics"]["memory"]["targets"] == 76
    assert provenance["lssvwm"] == provenance["causal_window"]
    sizes = {v: m.num_parameters() for v, m in models.items()}
    assert abs(sizes["causal_window"] / sizes["lssvwm"] - 1) < 0.1, sizes
    assert models["lssvwm"].cfg.prev_frames == models["causal_window"].cfg.prev_frames == 0
