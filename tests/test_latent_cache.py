"""The latent cache: the latents it serves equal the codec's encoding of the same windows, files are
reused, a different codec (or a stale / torn file) is never used, and training from it matches
training on frames encoded at every step."""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from worldsim.codec.autoencoder import CodecConfig, FrameCodec
from worldsim.codec.checkpoint import save_codec
from worldsim.data.minari_writer import DatasetWriter, Episode
from worldsim.data.windows import WindowDataset, WindowSampler
from worldsim.train import latent_cache as lc
from worldsim.train.trainer import TrainConfig, codec_fingerprint, train

WINDOW = 6
EPISODE_STEPS = (9, 14, 4)  # the last is shorter than a window: cached, never sliced


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """A Minari dataset of smooth random frames (blurred noise, so latents vary from frame to frame)."""
    root = tmp_path_factory.mktemp("latent-data")
    rng = np.random.default_rng(0)
    writer = DatasetWriter("test/latents-v0", gym.spaces.Box(0, 255, (64, 64, 3), np.uint8), gym.spaces.Discrete(6), root=root)
    for n in EPISODE_STEPS:
        coarse = rng.integers(0, 256, (n + 1, 8, 8, 3), dtype=np.uint8)
        frames = coarse.repeat(8, axis=1).repeat(8, axis=2)  # (n + 1, 64, 64, 3)
        no = np.zeros(n, bool)
        writer.append(Episode(frames, rng.integers(0, 6, n), rng.normal(size=n), terminations=no, truncations=no))
    return str(writer.path)


def make_codec(seed: int) -> FrameCodec:
    torch.manual_seed(seed)
    codec = FrameCodec(CodecConfig(channels=(8, 16, 16, 16), latent_channels=4, norm_groups=4)).eval()
    codec.set_latent_stats(torch.randn(4) * 0.1, torch.rand(4) + 0.5)  # non-trivial normalisation
    return codec.requires_grad_(False)


def build(windows: WindowDataset, codec: FrameCodec, root) -> tuple[list, int]:
    return lc.build_latent_cache(windows.stores, codec, codec_fingerprint(codec), root)


def test_cached_windows_equal_encoding_on_the_fly(data, tmp_path):
    windows = WindowDataset(data, window=WINDOW)
    codec = make_codec(0)
    folders, written = build(windows, codec, tmp_path)
    assert written == len(EPISODE_STEPS)
    cached = lc.LatentWindowDataset(windows, folders)
    assert len(cached) == len(windows) == (9 - WINDOW + 1) + (14 - WINDOW + 1)
    for i in range(len(windows)):
        raw, item = windows[i], cached[i]
        assert "frames" not in item and item["latents"].dtype == torch.float32
        with torch.no_grad():
            expected = codec.encode(raw["frames"])  # (T, C, h, w)
        # float32 storage, same network: equal up to summation order inside the convolutions
        # (bit-for-bit on the CPUs measured so far).
        torch.testing.assert_close(item["latents"], expected, rtol=1e-6, atol=1e-6)
        for key in ("actions", "rewards", "terminations", "episode", "start", "source"):
            assert torch.equal(item[key], raw[key]), key
    # A DataLoader (worker processes take a pickled copy that reopens its files) gives the same batches.
    loader = torch.utils.data.DataLoader(cached, batch_size=4, sampler=WindowSampler(cached, seed=1), num_workers=1)
    in_process = torch.utils.data.DataLoader(cached, batch_size=4, sampler=WindowSampler(cached, seed=1))
    for a, b in zip(loader, in_process):
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["episode"], b["episode"])


def test_cache_is_reused_and_a_different_codec_is_not(data, tmp_path):
    windows = WindowDataset(data, window=WINDOW)
    first, second = make_codec(0), make_codec(1)
    folders, written = build(windows, first, tmp_path)
    files = sorted(folders[0].glob("*.safetensors"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again, rewritten = build(windows, first, tmp_path)
    assert again == folders and rewritten == 0
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read, not rewritten

    other, written = build(windows, second, tmp_path)
    assert written == len(EPISODE_STEPS) and other[0] != folders[0]
    with torch.no_grad():
        frames = windows[0]["frames"]
        expected = second.encode(frames)
        assert not torch.allclose(first.encode(frames), expected)
    torch.testing.assert_close(lc.LatentWindowDataset(windows, other)[0]["latents"], expected, rtol=1e-6, atol=1e-6)


def test_stale_or_torn_files_are_re_encoded(data, tmp_path):
    windows = WindowDataset(data, window=WINDOW)
    first, second = make_codec(0), make_codec(1)
    folders, _ = build(windows, first, tmp_path)
    other, _ = build(windows, second, tmp_path)
    ep0, ep1 = lc.episode_file(folders[0], 0), lc.episode_file(folders[0], 1)
    # Another codec's file copied over (its header names the other weights), and a torn write.
    foreign = load_file(lc.episode_file(other[0], 0))
    header = {**lc._expected_header(codec_fingerprint(second), windows.stores[0], 0)}
    save_file(foreign, str(ep0), metadata=header)
    ep1.write_bytes(ep1.read_bytes()[:100])
    sha = codec_fingerprint(first)
    assert "codec_sha256" in lc.stale_reason(ep0, lc._expected_header(sha, windows.stores[0], 0), (4, 8, 8))
    assert "unreadable" in lc.stale_reason(ep1, lc._expected_header(sha, windows.stores[0], 1), (4, 8, 8))
    with pytest.raises(ValueError, match="episode_000000.safetensors: header differs in codec_sha256"):
        lc.check_latent_cache(folders, windows.stores, sha, (4, 8, 8))

    _, written = build(windows, first, tmp_path)
    assert written == 2
    lc.check_latent_cache(folders, windows.stores, sha, (4, 8, 8))
    with torch.no_grad():
        expected = first.encode(windows[0]["frames"])
    torch.testing.assert_close(lc.LatentWindowDataset(windows, folders)[0]["latents"], expected, rtol=1e-6, atol=1e-6)
    assert not list(folders[0].glob(".*tmp"))  # atomic writes leave no temporary files


def test_training_from_the_cache_matches_encoding_every_step(data, tmp_path):
    codec_dir = save_codec(make_codec(0), tmp_path / "codec")

    def run(name: str, cache: bool, **kw) -> TrainConfig:
        return TrainConfig(
            datasets=(data,), codec=str(codec_dir), run_dir=str(tmp_path / name), preset="tiny", window=WINDOW,
            batch_size=2, steps=6, lr=2e-3, warmup_steps=2, log_every=1, checkpoint_every=3, sample_every=0,
            progress=False, latent_cache=cache, **kw,
        )  # fmt: skip

    on_the_fly = train(run("frames", cache=False))
    cached = train(run("cached", cache=True))
    assert not (tmp_path / "frames" / lc.CACHE_DIR).exists()
    assert len(list((tmp_path / "cached" / lc.CACHE_DIR).rglob("episode_*.safetensors"))) == len(EPISODE_STEPS)
    assert [s for s, _ in cached.losses] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in cached.losses], [v for _, v in on_the_fly.losses], rtol=1e-5)

    # Stop and resume on the cache: the cache is reused and the losses are those of the whole run.
    first = train(run("resumed", cache=True, stop_after=3))
    files = sorted((tmp_path / "resumed" / lc.CACHE_DIR).rglob("episode_*.safetensors"))
    stamps = [os.stat(f).st_mtime_ns for f in files]
    second = train(run("resumed", cache=True, resume=True))
    assert [os.stat(f).st_mtime_ns for f in files] == stamps
    assert first.losses + second.losses == cached.losses
