"""The frame codec: shapes, learning on real (written-to-disk) episodes, checkpoints, resume."""

from __future__ import annotations

import hashlib
import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import torch.nn.functional as F

from worldsim.codec.autoencoder import DECODE_CHUNK, PRESETS, FrameCodec, Upsample, preset
from worldsim.codec.checkpoint import CheckpointError, load_codec, load_codec_into, save_codec
from worldsim.codec.train import CodecTrainConfig, TrainingDiverged, evaluate_psnr, train_codec
from worldsim.data.minari_writer import DatasetWriter, Episode

SIZE = 32  # frames of the test dataset; the tiny preset at this size has an 8x8x4 latent
EPISODES, STEPS = 3, 40


pytestmark = pytest.mark.usefixtures("one_thread")


def scene(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """n frames (n, size, size, 3) uint8: a colour gradient with three coloured blocks drifting."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 6, yy * 6, (xx + yy) * 3], -1).clip(0, 255)  # (S, S, 3)
    pos = rng.uniform(0, size - 8, (3, 2))
    vel = rng.uniform(-1.0, 1.0, (3, 2))
    colours = rng.integers(0, 256, (3, 3))
    frames = np.empty((n, size, size, 3), np.uint8)
    for t in range(n):
        img = base.copy()
        for k in range(3):
            y, x = ((pos[k] + vel[k] * t) % (size - 8)).astype(int)
            img[y : y + 8, x : x + 6] = colours[k]
        frames[t] = img
    return frames


def write_dataset(root, name: str, size: int, episodes: int, steps: int) -> str:
    space = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
    writer = DatasetWriter(name, space, gym.spaces.Discrete(3), root=root)
    rng = np.random.default_rng(0)
    for _ in range(episodes):
        done = np.zeros(steps, bool)
        done[-1] = True
        writer.append(
            Episode(
                observations=scene(rng, steps + 1, size), actions=rng.integers(0, 3, steps),
                rewards=np.zeros(steps), terminations=np.zeros(steps, bool), truncations=done,
            )  # fmt: skip
        )
    return str(writer.path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("datasets")
    return write_dataset(root, "test/codec-v0", SIZE, EPISODES, STEPS)


def config(dataset: str, run_dir, **kw) -> CodecTrainConfig:
    base = dict(
        datasets=(dataset,), run_dir=str(run_dir), codec=preset("tiny", image_size=SIZE),
        steps=6, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=3, checkpoint_every=3,
        val_episodes=1, val_frames=16, stats_frames=EPISODES * STEPS, progress=False,
    )  # fmt: skip
    return CodecTrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_encode_decode_shapes(name):
    torch.manual_seed(0)
    codec = FrameCodec(PRESETS[name]).eval()
    frames = torch.randint(0, 256, (2, 1, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        z = codec.encode(frames)
        x = codec.decode(z)
        x8 = codec.decode(z, as_uint8=True)
    assert z.shape == (2, 1, *PRESETS[name].latent_shape) and z.dtype == torch.float32
    assert x.shape == (2, 1, 64, 64, 3) and 0.0 <= x.min() and x.max() <= 1.0
    assert x8.dtype == torch.uint8 and torch.equal(x8, (x * 255).round().to(torch.uint8))
    assert PRESETS["small"].latent_shape == (16, 8, 8)


@pytest.mark.parametrize("channels_last", [False, True])
def test_subpixel_upsampling_equals_nearest_then_conv(channels_last):
    torch.manual_seed(0)
    up = Upsample(6, 5)
    x = torch.randn(2, 6, 5, 7)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=layout)
    plain = up(x).detach()  # gradients on: nearest 2x, then the 3x3 conv (the training path)
    with torch.no_grad():
        fast = up(x)  # the sub-pixel form
        assert fast.shape == (2, 5, 10, 14) and fast.is_contiguous(memory_format=layout)
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
        up.conv.weight.mul_(-2.0)  # an updated weight is folded again
        changed = F.conv2d(F.interpolate(x, scale_factor=2.0), up.conv.weight, up.conv.bias, padding=1)
        torch.testing.assert_close(up(x), changed, atol=1e-5, rtol=0)


def test_decode_matches_the_plain_decoder():
    """`decode` (channels-last, chunks of DECODE_CHUNK frames, sub-pixel upsampling) against the
    decoder run as it trains: contiguous NCHW, the whole batch, nearest upsampling + conv."""
    torch.manual_seed(0)
    codec = FrameCodec(PRESETS["small"]).eval()
    with torch.no_grad():
        for p in codec.parameters():
            if (p == 0).all():  # zero-initialised convs: make every block do something
                p.normal_(0, 0.05)
        codec.set_latent_stats(torch.randn(16) * 0.1, torch.rand(16) + 0.5)
        z = torch.randn(DECODE_CHUNK + 3, 16, 8, 8)  # the last chunk is short
        fast = codec.decode(z)
    raw = codec.decode_raw(z * codec.latent_std[:, None, None] + codec.latent_mean[:, None, None]).detach()
    plain = ((raw + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1)  # (B, H, W, 3)
    assert fast.is_contiguous()
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


def test_bad_inputs_are_named():
    codec = FrameCodec(PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"\(\.\.\., 64, 64, 3\)"):
        codec.encode(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))  # channels first
    with pytest.raises(TypeError, match="uint8"):
        codec.encode(torch.zeros(2, 64, 64, 3))
    with pytest.raises(ValueError, match="latents must have shape"):
        codec.decode(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="not divisible"):
        preset("small", image_size=60)
    with pytest.raises(ValueError, match="unknown codec preset"):
        preset("huge")


def test_command_choices_match_presets():
    from worldsim.commands.train_codec import CodecPreset

    assert sorted(p.value for p in CodecPreset) == sorted(PRESETS)


# ---------------------------------------------------------------------------------- learning
def test_training_raises_held_out_psnr_and_normalises_latents(dataset, tmp_path):
    run = tmp_path / "run"
    cfg = config(dataset, run, steps=80, batch_size=16, eval_every=80, checkpoint_every=80)
    torch.manual_seed(cfg.seed)  # the same initial weights train_codec starts from
    untrained = FrameCodec(cfg.codec)
    result = train_codec(cfg)

    codec = load_codec(tmp_path / "run")
    held_out = torch.from_numpy(scene(np.random.default_rng(123), 32, SIZE))  # never trained on
    before, _ = evaluate_psnr(untrained, held_out)
    after, _ = evaluate_psnr(codec, held_out)
    print(f"held-out PSNR {before:.2f} -> {after:.2f} dB (run: {result.val_psnr:.2f})")
    assert after > before + 6.0, (before, after)
    assert result.val_psnr > before + 5.0  # the run's own held-out episode
    assert result.step == 80 and result.history[-1] == (80, result.val_psnr)

    # Latent stats were measured on all training frames: there, every channel is ~N(0, 1).
    from worldsim.data.windows import WindowDataset

    ds = WindowDataset(dataset, window=1)
    train = [i for i in range(len(ds)) if ds.locate(i)[1] < EPISODES - 1]  # the last is held out
    train_frames = torch.stack([ds[i]["frames"][0] for i in train])
    with torch.no_grad():
        z = codec.encode(train_frames)  # (N, C, h, w)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-3)
    assert torch.allclose(z.std(dim=(0, 2, 3), correction=0), torch.ones(4), atol=1e-3)


# ------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_is_exact(tmp_path):
    torch.manual_seed(1)
    codec = FrameCodec(PRESETS["tiny"])
    codec.set_latent_stats(torch.rand(4), torch.rand(4) + 0.5)
    save_codec(codec, tmp_path / "ckpt")
    loaded = load_codec(tmp_path / "ckpt")
    pairs = zip(codec.state_dict().items(), loaded.state_dict().items(), strict=True)
    for (k, a), (k2, b) in pairs:
        assert k == k2 and torch.equal(a, b), k
    frames = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(codec.eval().encode(frames), loaded.encode(frames))


def test_mismatched_config_fails_clearly(tmp_path):
    save_codec(FrameCodec(PRESETS["tiny"]), tmp_path / "ckpt")
    other = preset("tiny", latent_channels=8)
    with pytest.raises(CheckpointError, match=r"latent_channels: expected 8, checkpoint has 4"):
        load_codec_into(FrameCodec(other), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="latent_channels"):
        load_codec(tmp_path / "ckpt", expect=other)

    # A weights file whose header disagrees with codec.json (a torn / mixed copy).
    save_codec(FrameCodec(other), tmp_path / "other")
    other_weights = (tmp_path / "other" / "codec.safetensors").read_bytes()
    (tmp_path / "ckpt" / "codec.safetensors").write_bytes(other_weights)
    with pytest.raises(CheckpointError, match="torn or mixed"):
        load_codec(tmp_path / "ckpt")

    header = json.loads((tmp_path / "other" / "codec.json").read_text())
    (tmp_path / "other" / "codec.json").write_text(json.dumps({**header, "version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        load_codec(tmp_path / "other")
    with pytest.raises(CheckpointError, match="no codec.json"):
        load_codec(tmp_path)


# ------------------------------------------------------------------------------------ resume
def test_resume_matches_an_uninterrupted_run(dataset, tmp_path):
    straight = train_codec(config(dataset, tmp_path / "a"))
    first = train_codec(config(dataset, tmp_path / "b", stop_after=3))
    assert first.step == 3
    resumed = train_codec(config(dataset, tmp_path / "b"), resume=True)
    assert resumed.step == straight.step == 6

    a, b = load_codec(tmp_path / "a"), load_codec(tmp_path / "b")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k
    with (
        safe_open(straight.checkpoint / "trainer.safetensors", "pt") as fa,
        safe_open(resumed.checkpoint / "trainer.safetensors", "pt") as fb,
    ):
        assert sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():  # optimizer moments, step counters and the augmentation RNG
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k
    assert straight.val_psnr == resumed.val_psnr

    with pytest.raises(CheckpointError, match="batch_size: run has 8, asked for 4"):
        train_codec(config(dataset, tmp_path / "b", steps=9, batch_size=4), resume=True)
    with pytest.raises(CheckpointError, match="codec config differs"):
        wider = preset("tiny", image_size=SIZE, latent_channels=8)
        train_codec(config(dataset, tmp_path / "b", steps=9, codec=wider), resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        train_codec(config(dataset, tmp_path / "b", steps=9))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_codec(config(dataset, tmp_path / "c"), resume=True)


def test_decoder_only_fine_tune_keeps_the_latent_space(dataset, tmp_path):
    from worldsim.codec.checkpoint import codec_fingerprint, codec_matches, full_codec_fingerprint

    base = train_codec(config(dataset, tmp_path / "base", steps=20, eval_every=20, checkpoint_every=20))
    start = load_codec(tmp_path / "base")
    tuned_run = config(dataset, tmp_path / "tuned", init_from=str(base.checkpoint), decoder_only=True,
                       steps=60, eval_every=60, checkpoint_every=60, codec=None, preset="small")
    assert tuned_run.codec_config() == start.config  # the source's config, not the preset's
    result = train_codec(tuned_run)
    tuned = load_codec(tmp_path / "tuned")

    before, after = start.state_dict(), tuned.state_dict()
    for k, v in before.items():  # encoder and latent stats bit for bit, the decoder trained
        assert torch.equal(v, after[k]) != k.startswith("decoder."), k
    frames = torch.from_numpy(scene(np.random.default_rng(7), 16, SIZE))
    with torch.no_grad():
        assert torch.equal(start.encode(frames), tuned.encode(frames))
    assert result.val_psnr > base.val_psnr + 0.5, (base.val_psnr, result.val_psnr)
    # World models, runs and latent caches keyed by the codec still accept the tuned one.
    assert codec_fingerprint(tuned) == codec_fingerprint(start)
    assert full_codec_fingerprint(tuned) != full_codec_fingerprint(start)
    assert codec_matches(full_codec_fingerprint(start), start)  # what older runs recorded
    # An older run's record of the original codec accepts the tuned one while the original is on disk.
    assert not codec_matches(full_codec_fingerprint(start), tuned)
    assert codec_matches(full_codec_fingerprint(start), tuned, str(base.checkpoint))
    assert not codec_matches(full_codec_fingerprint(start), FrameCodec(start.config), str(base.checkpoint))
    assert not codec_matches(codec_fingerprint(start), FrameCodec(start.config))

    with pytest.raises(ValueError, match="decoder_only needs init_from"):
        train_codec(config(dataset, tmp_path / "bad", decoder_only=True))
    with pytest.raises(ValueError, match="texture_weight must be a finite number >= 0"):
        train_codec(config(dataset, tmp_path / "bad", texture_weight=-1.0))
    with pytest.raises(CheckpointError, match="decoder_only: run has True, asked for False"):
        train_codec(config(dataset, tmp_path / "tuned", init_from=str(base.checkpoint), steps=70), resume=True)


def test_texture_loss_asks_for_texture_not_for_its_phase():
    # A striped wall (period 4 px), its blur, and the same stripes shifted by 2 px (opposite phase).
    # The pixel losses prefer the blur to the shifted stripes; the texture loss prefers the
    # stripes wherever they lie, so a decoder unsure of the phase still draws them.
    from worldsim.codec.train import reconstruction_losses, texture_loss

    x = torch.arange(64.0)
    stripes = (0.3 * torch.sign(torch.sin(math.pi * (x + 0.5) / 2)))[None, None, None, :].expand(2, 3, 64, 64)
    blurred = torch.zeros_like(stripes)  # the stripes averaged away: flat grey
    shifted = stripes.roll(2, dims=-1)
    assert texture_loss(stripes, stripes) == 0
    assert texture_loss(shifted, stripes) < 0.01 * texture_loss(blurred, stripes)
    pixel = {name: reconstruction_losses(r, stripes) for name, r in (("blurred", blurred), ("shifted", shifted))}
    for term in ("l1", "mse", "edge"):
        assert pixel["blurred"][term] < pixel["shifted"][term], term


def test_a_run_with_legacy_folder_names_resumes(dataset, tmp_path):
    """Codec runs written before 2026-11-26 named checkpoints step-<8 digits>; they still resume."""
    train_codec(config(dataset, tmp_path / "run", stop_after=3))
    old = tmp_path / "run" / "checkpoints" / "step_000003"
    old.rename(old.with_name("step-00000003"))
    (tmp_path / "run" / "latest.json").write_text(json.dumps({"step": 3, "checkpoint": "checkpoints/step-00000003"}))
    assert load_codec(tmp_path / "run") is not None
    resumed = train_codec(config(dataset, tmp_path / "run", keep_checkpoints=1), resume=True)
    assert resumed.step == 6 and resumed.checkpoint.name == "step_000006"
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_000006"]


def test_nan_guard_stops_with_a_clear_message(dataset, tmp_path):
    result = train_codec(config(dataset, tmp_path / "run", steps=4, stop_after=2))
    weights = result.checkpoint / "codec.safetensors"
    with safe_open(weights, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["encoder.conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, weights, metadata=meta)
    # Weights that went bad in training, not on disk: record the new file's hash as the writer would.
    header_file = result.checkpoint / "codec.json"
    header = json.loads(header_file.read_text())
    header["sha256"] = {"codec.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    header_file.write_text(json.dumps(header))
    message = r"non-finite loss \(nan\) at step 3; training stopped. Last good checkpoint: .*step_000002"
    with pytest.raises(TrainingDiverged, match=message):
        train_codec(config(dataset, tmp_path / "run", steps=4), resume=True)


def test_frame_size_mismatch_is_named(dataset, tmp_path):
    with pytest.raises(ValueError, match="frames are 32x32x3 but the codec expects 64x64x3"):
        train_codec(config(dataset, tmp_path / "run", codec=PRESETS["tiny"]))


def test_command_trains_and_reports_psnr(dataset, tmp_path):
    import typer
    from typer.testing import CliRunner

    from worldsim.commands.train_codec import train_codec as command

    app = typer.Typer()
    app.command()(command)
    app.command("noop")(lambda: None)  # two commands: typer then expects the command name
    frames64 = write_dataset(tmp_path / "datasets", "test/codec64-v0", 64, 2, 6)
    args = ["train-codec", "--preset", "tiny", "--steps", "2", "--batch-size", "4", "--no-progress"]
    res = CliRunner().invoke(app, [*args, frames64, "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "step 2: held-out PSNR" in res.output
    assert load_codec(tmp_path / "run").config == PRESETS["tiny"]

    # The 32x32 frames do not fit the 64x64 tiny preset: a clear error and exit code 1.
    res = CliRunner().invoke(app, [*args, dataset, "--out", str(tmp_path / "run32")])
    assert res.exit_code == 1 and "codec expects 64x64x3" in res.output, res.output
    # An existing run without --resume is refused rather than overwritten.
    res = CliRunner().invoke(app, [*args, frames64, "--out", str(tmp_path / "run")])
    assert res.exit_code == 1 and "--resume" in res.output, res.output


def test_bf16_decoding_stays_within_two_grey_levels_of_float32(monkeypatch):
    """The bundled codec decoding real frames: bfloat16 convolutions (the batched dream env's fast
    path) give the float32 frames back to a grey level or two."""
    from worldsim.bundled import PACKAGE_BUNDLE_DIR, is_bundle, load_bundled

    monkeypatch.delenv("WORLDSIM_BUNDLE_DIR", raising=False)
    if not is_bundle(PACKAGE_BUNDLE_DIR):
        pytest.skip(f"no bundled model in this checkout ({PACKAGE_BUNDLE_DIR})")
    bundle = load_bundled()
    frames = torch.from_numpy(np.ascontiguousarray(bundle.clips.frames.reshape(-1, 64, 64, 3)[:16]))
    with torch.no_grad():
        z = bundle.codec.encode(frames)
        exact, fast = bundle.codec.decode(z, as_uint8=True), bundle.codec.decode(z, as_uint8=True, bf16=True)
    diff = exact.float() - fast.float()
    assert fast.dtype == torch.uint8 and fast.shape == exact.shape
    assert 0 < diff.abs().max() <= 3
    assert 10 * math.log10(255**2 / diff.pow(2).mean().item()) > 45


def test_bf16_decoding_is_chosen_only_where_it_pays(monkeypatch):
    from worldsim.codec import autoencoder
    from worldsim.utils import cpu

    monkeypatch.setattr(cpu, "has_amx", lambda: True)
    assert autoencoder.bf16_decode_pays("cpu", 8) and autoencoder.bf16_decode_pays(torch.device("cpu"), 64)
    assert not autoencoder.bf16_decode_pays("cpu", 1)  # slower for one frame (per-op overhead)
    assert not autoencoder.bf16_decode_pays("cuda", 64)
    monkeypatch.setattr(cpu, "has_amx", lambda: False)
    assert not autoencoder.bf16_decode_pays("cpu", 64)  # emulated without AMX
