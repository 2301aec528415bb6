"""`worldsim dream` and examples/quickstart.py with a real tiny world model and codec (random init)
saved as checkpoints, against the live Memory Maze and a Minari dataset context."""

import os
import re
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from worldsim.commands.dream import dream as dream_command
from worldsim.dream import DreamConfig, NoModelError, dream
from tiny_world import save_tiny_run

ROOT = Path(__file__).resolve().parents[1]
SCALE = 2

# The command alone (the CLI registers it under `worldsim dream`).
app = typer.Typer()
app.command()(dream_command)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A world-model run folder whose sidecar records a tiny codec, as `worldsim train` writes it."""
    return save_tiny_run(tmp_path_factory.mktemp("dream"))


def test_cli_live_maze_writes_side_by_side_mp4_and_prints_fps(checkpoint, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "dream.mp4"
    steps = 6
    result = CliRunner().invoke(app, ["--checkpoint", str(checkpoint), "--steps", str(steps), "--out", str(out),
                                      "--sampler-steps", "1", "--scale", str(SCALE), "--policy", "scripted", "--seed", "3"])
    assert result.exit_code == 0, result.output
    frames = iio.imread(out)
    assert frames.shape == (steps + 1, 64 * SCALE, 2 * 64 * SCALE, 3)  # real | dream, plus the context frame
    fps = float(re.search(r"dream: ([0-9.]+) fps", result.output).group(1))
    worst = float(re.search(r"max ([0-9.]+) ms", result.output).group(1))
    assert fps > 0 and 1e3 / fps <= worst + 0.1  # fps counts the timed steps only: mean step <= slowest
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed into place


def test_real_side_replays_the_same_actions(checkpoint, tmp_path):
    """The left half is the real env continuing from the context: same seed -> same real frames."""
    a = dream(DreamConfig(checkpoint=str(checkpoint), steps=4, out=str(tmp_path / "a.gif"), sampler_steps=1,
                          scale=1, seed=5, policy="random"))
    b = dream(DreamConfig(checkpoint=str(checkpoint), steps=4, out=str(tmp_path / "b.gif"), sampler_steps=1,
                          scale=1, seed=5, policy="random"))
    va, vb = iio.imread(a.out), iio.imread(b.out)
    assert va.shape[:3] == (5, 64, 128) and a.side_by_side and a.width == 128
    assert np.array_equal(va, vb)  # GIF is lossless: the whole rollout is fixed by the seed
    assert not np.array_equal(va[1, :, :64], va[-1, :, :64])  # the real env moved


def test_dream_runs_on_its_threads_and_gives_the_callers_back(checkpoint, tmp_path):
    """One torch thread while dreaming by default (faster for one stream), the caller's after."""
    seen = []
    original = torch.Tensor.numpy

    def numpy_noting_threads(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.Tensor, "numpy", numpy_noting_threads)
            dream(DreamConfig(checkpoint=str(checkpoint), steps=2, out=str(tmp_path / "a.gif"), sampler_steps=1, scale=1))
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="--threads must be >= 1"):
            dream(DreamConfig(checkpoint=str(checkpoint), threads=0, out=str(tmp_path / "b.gif")))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_video_is_real_left_dream_right_and_labelled(checkpoint, tmp_path):
    """Frame 0's left half is the real env's frame after the context (a separate env driven the
    same way), apart from the "real" label; the right half is the dream, labelled "dream"."""
    from worldsim.data.exploration import RandomWalk
    from worldsim.dream import live_context
    from worldsim.envs.memory_maze import MemoryMazeEnv
    from worldsim.utils.labels import LABEL_HEIGHT, label_panels

    r = dream(DreamConfig(checkpoint=str(checkpoint), steps=2, out=str(tmp_path / "a.gif"), sampler_steps=1,
                          scale=1, seed=5, policy="random", context_frames=4))
    video = iio.imread(r.out)[..., :3]
    env = MemoryMazeEnv(size=9)
    try:
        rng = np.random.default_rng(5)
        *_, real, _ = live_context(env, RandomWalk(), 4, 5, rng)
    finally:
        env.close()
    def off(a, b) -> float:  # mean abs difference; a GIF's palette moves colours by a level or two
        return float(np.abs(a.astype(int) - b.astype(int)).mean())

    frame = video[0]
    assert off(frame[LABEL_HEIGHT:, :64], real[LABEL_HEIGHT:]) < 2  # real on the left
    assert off(frame[LABEL_HEIGHT:, 64:], real[LABEL_HEIGHT:]) > 5  # the dream (random init) is not it
    labelled = label_panels(np.concatenate([real, frame[:, 64:]], axis=1), ["real", "dream"])
    assert off(frame, labelled) < 2  # the labels are all that differs
    assert off(frame[:LABEL_HEIGHT, :20], real[:LABEL_HEIGHT, :20]) > 20  # ... and they are drawn
    corner = frame[:LABEL_HEIGHT, 64:84]  # "dream": white text on a black box, on the right panel
    assert (corner < 30).all(axis=-1).mean() > 0.4 and (corner > 200).all(axis=-1).any()


def test_dataset_context_writes_dream_only(checkpoint, tmp_path):
    from worldsim.data.minari_writer import DatasetWriter, Episode

    rng = np.random.default_rng(1)
    writer = DatasetWriter("dream/cmd-v0", gym.spaces.Box(0, 255, (64, 64, 3), np.uint8), gym.spaces.Discrete(6), root=tmp_path)
    no = np.zeros(11, bool)
    writer.append(Episode(rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8), rng.integers(0, 6, 11), np.zeros(11), no, no))
    r = dream(DreamConfig(checkpoint=str(checkpoint), context=str(writer.path), steps=3, out=str(tmp_path / "d.mp4"),
                          sampler_steps=1, scale=1))
    video = iio.imread(r.out)
    assert not r.side_by_side and video.shape == (4, 64, 64, 3)
    assert (video[:, :8, :16] < 40).mean() > 0.4 and (video[:, :8, :16] > 200).any()  # "dream" on a dark box
    with pytest.raises(ValueError, match="scripted.*memory-maze"):
        dream(DreamConfig(checkpoint=str(checkpoint), context=str(writer.path), policy="scripted", out=str(tmp_path / "e.mp4")))


def test_no_checkpoint_explains_how_to_get_one(tmp_path):
    with pytest.raises(NoModelError, match="worldsim train"):
        dream(DreamConfig(out=str(tmp_path / "x.mp4")))
    result = CliRunner().invoke(app, ["--out", str(tmp_path / "x.mp4")])
    assert result.exit_code == 2 and "--checkpoint" in result.output and "worldsim train" in result.output
    assert not (tmp_path / "x.mp4").exists()


def test_bad_output_suffix_and_policy(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"\.mp4 or \.gif"):
        dream(DreamConfig(checkpoint=str(checkpoint), out=str(tmp_path / "x.avi")))
    with pytest.raises(ValueError, match="random, scripted"):
        dream(DreamConfig(checkpoint=str(checkpoint), policy="greedy", out=str(tmp_path / "x.mp4")))


def test_quickstart_example_runs_as_a_script(checkpoint, tmp_path):
    out = tmp_path / "quick.mp4"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--checkpoint", str(checkpoint),
                           "--steps", "3", "--out", str(out), "--sampler-steps", "1"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"[0-9.]+ fps", proc.stdout)
    assert iio.imread(out).shape[0] == 4
