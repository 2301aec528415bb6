"""`worldsim pack`: episodes -> H.264 videos + .npy arrays + a manifest that numpy and OpenCV read
back; the frames come back close to the originals and the arrays exactly; a corrupt or
inconsistent pack is refused naming the file; --max-mib cuts and drops episodes, and says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from typer.testing import CliRunner

from worldsim.cli import app
from worldsim.data.minari_writer import DatasetWriter, Episode
from worldsim.data.pack import (MANIFEST_FILE, PackError, decode_video, open_pack, pack_bytes, psnr_db,
                                read_manifest, write_pack)
from worldsim.data.windows import WindowDataset

EPISODE_STEPS = (30, 45, 150)


def smooth_frames(rng, n: int) -> np.ndarray:
    """(n, 64, 64, 3) uint8: 8x8 blocks drifting slowly, so H.264 compresses them like real video."""
    base = rng.integers(0, 256, (8, 8, 3)).astype(np.float64)
    drift = rng.normal(0, 6, (n, 8, 8, 3)).cumsum(axis=0)
    coarse = np.clip(base + drift, 0, 255).astype(np.uint8)
    return coarse.repeat(8, axis=1).repeat(8, axis=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("pack-data")
    rng = np.random.default_rng(0)
    writer = DatasetWriter("test/pack-v0", gym.spaces.Box(0, 255, (64, 64, 3), np.uint8), gym.spaces.Discrete(6), root=root)
    for i, n in enumerate(EPISODE_STEPS):
        term = np.zeros(n, bool)
        term[-1] = i == 0
        writer.append(Episode(smooth_frames(rng, n + 1), rng.integers(0, 6, n), rng.normal(size=n).astype(np.float32),
                              terminations=term, truncations=np.zeros(n, bool)))
    return str(writer.path)


@pytest.fixture(scope="module")
def pack(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "p"
    summary = write_pack([dataset], out, progress=False, log=lambda s: None)
    return out, summary


def test_pack_round_trip(dataset, pack):
    out, summary = pack
    assert (summary.episodes, summary.steps, summary.dropped_steps) == (3, sum(EPISODE_STEPS), 0)
    p = open_pack(out)
    manifest = p.manifest
    assert manifest["frame_shape"] == [64, 64, 3]
    assert manifest["action_space"]["type"] == "discrete" and manifest["action_space"]["n"] == 6
    assert manifest["video"]["pix_fmt"] == "yuv444p" and manifest["codec_sha256"] is None
    assert [e["steps"] for e in p.episodes] == list(EPISODE_STEPS)
    assert set(manifest["files"]) == {"actions.npy", "rewards.npy", "terminations.npy", "truncations.npy",
                                      *(e["video"] for e in p.episodes)}
    windows = WindowDataset(dataset, window=1)
    frames = p.all_frames(workers=2)
    for i, n in enumerate(EPISODE_STEPS):
        real = windows.stores[0].read(i, 0, n)
        rows = slice(p.offsets[i], p.offsets[i] + n)
        np.testing.assert_array_equal(p.actions[rows], real["actions"])
        np.testing.assert_array_equal(p.rewards[rows], real["rewards"])
        np.testing.assert_array_equal(p.terminations[rows], real["terminations"])
        np.testing.assert_array_equal(p.truncations[rows], real["truncations"])
        assert psnr_db(real["frames"], frames[rows]) > 35  # H.264 yuv444p CRF 12: close, not exact
        assert abs(psnr_db(real["frames"], frames[rows]) - p.episodes[i]["psnr_db"]) < 1e-2
        np.testing.assert_array_equal(frames[rows], p.frames(i))
    assert p.actions.dtype == np.int64 and p.rewards.dtype == np.float32 and p.terminations.dtype == bool


def test_both_decoders_give_the_same_frames(pack):
    pytest.importorskip("cv2")
    out, _ = pack
    p = open_pack(out)
    e = p.episodes[1]
    np.testing.assert_array_equal(decode_video(out / e["video"], e["steps"], (64, 64, 3), backend="cv2"),
                                  decode_video(out / e["video"], e["steps"], (64, 64, 3), backend="ffmpeg"))


@pytest.mark.parametrize("damage, match", [
    ("video", r"videos/ep_000001\.mp4: corrupt \(its sha256 differs"),
    ("missing", r"rewards\.npy: missing from the pack"),
    ("version", r"manifest\.json: pack format version 99"),
    ("steps", r"manifest\.json: episodes hold"),
])  # fmt: skip
def test_a_damaged_pack_is_refused_naming_the_file(pack, tmp_path, damage, match):
    out = tmp_path / "p"
    shutil.copytree(pack[0], out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    if damage == "video":
        data = bytearray((out / "videos/ep_000001.mp4").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (out / "videos/ep_000001.mp4").write_bytes(bytes(data))
    elif damage == "missing":
        (out / "rewards.npy").unlink()
    elif damage == "version":
        manifest["version"] = 99
    elif damage == "steps":
        manifest["total_steps"] += 1
    if damage in ("version", "steps"):
        (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(PackError, match=match):
        open_pack(out)


def test_a_video_shorter_than_the_manifest_says_is_named(pack, tmp_path):
    out = tmp_path / "p"
    shutil.copytree(pack[0], out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["episodes"][0]["steps"] += 5  # the video holds 5 frames fewer than this says
    with pytest.raises(PackError, match=r"ep_000000\.mp4: decodes to 30 frames, the manifest says 35"):
        decode_video(out / manifest["episodes"][0]["video"], manifest["episodes"][0]["steps"], (64, 64, 3))
    assert read_manifest(out)["format"] == "worldsim-pack"
    with pytest.raises(PackError, match="not a pack"):
        open_pack(tmp_path)


def test_max_mib_cuts_and_drops_episodes_and_says_so(dataset, pack, tmp_path):
    full = pack_bytes(pack[0])
    last_video = (pack[0] / "videos/ep_000002.mp4").stat().st_size
    notes: list[str] = []
    # Room for about 60 % of the last episode: it is cut (>= 64 steps still fit).
    summary = write_pack([dataset], tmp_path / "cut", max_mib=(full - 0.4 * last_video) / 2**20, progress=False,
                         log=notes.append)
    assert summary.episodes == 3 and summary.dropped_episodes == 0 and len(summary.trimmed) == 1
    pack_ep, kept, had = summary.trimmed[0]
    assert pack_ep == 2 and had == 150 and 64 <= kept < 150 and summary.dropped_steps == had - kept
    assert notes == [f"note: {n}" for n in summary.notes] and "cut to" in notes[0]
    p = open_pack(tmp_path / "cut")
    assert p.episodes[2]["steps"] == kept and p.episodes[2]["trimmed_from"] == 150 and p.total_steps == 75 + kept
    assert len(p.frames(2)) == kept and p.manifest["dropped"]["notes"] == summary.notes
    # Room for less than 64 steps of it: dropped whole.
    capped = write_pack([dataset], tmp_path / "drop", max_mib=(full - 0.9 * last_video) / 2**20, progress=False,
                        log=lambda s: None)
    assert (capped.episodes, capped.dropped_episodes, capped.dropped_steps) == (2, 1, 150)
    assert "1 of 3 episodes (150 steps) dropped" in capped.notes[0]
    for folder, cap in (("cut", full - 0.4 * last_video), ("drop", full - 0.9 * last_video)):
        assert pack_bytes(tmp_path / folder) <= cap
    with pytest.raises(PackError, match="already exists"):
        write_pack([dataset], tmp_path / "cut", progress=False)
    with pytest.raises(PackError, match="not even 64 steps"):
        write_pack([dataset], tmp_path / "tiny", max_mib=0.001, progress=False)


def test_pack_command(dataset, tmp_path):
    result = CliRunner().invoke(app, ["pack", dataset, "--out", str(tmp_path / "p"), "--episodes", "2", "--no-progress",
                                      "--crf", "18"])
    assert result.exit_code == 0, result.output
    assert "2 episodes, 75 steps" in result.output
    assert open_pack(tmp_path / "p").manifest["video"]["crf"] == 18
    again = CliRunner().invoke(app, ["pack", dataset, "--out", str(tmp_path / "p")])
    assert again.exit_code == 1 and "already exists" in again.output


def test_the_default_cap_fits_a_call_beside_the_repository():
    """A lent machine's call carries 64 MiB: the repository's tracked files plus the pack. The
    default cap must leave room for the repository as it is (bundles grow it), and the CLI's
    default must be the library's."""
    import inspect
    import subprocess

    from worldsim.commands.pack import pack as pack_command
    from worldsim.data.pack import DEFAULT_MAX_MIB

    assert inspect.signature(pack_command).parameters["max_mib"].default.default == DEFAULT_MAX_MIB
    root = Path(__file__).resolve().parents[1]
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the repository's size is unknown")
    tracked = sum((root / name).stat().st_size for name in listed.stdout.decode().split("\0")
                  if name and (root / name).is_file())
    assert tracked + DEFAULT_MAX_MIB * 2**20 <= 64 * 2**20 - 2**20, (tracked / 2**20, DEFAULT_MAX_MIB)
