"""`worldsim eval realism`: the sharpness score and the Fréchet feature distance on real Memory
Maze frames (blur must score below the original, real frames near 1.0), and the evaluation end to
end with a real tiny world model on a small Minari dataset."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import worldsim.envs  # noqa: F401 (registers the ids)
from worldsim.codec.autoencoder import FrameCodec, preset
from worldsim.commands.evaluate import eval_app
from worldsim.data.minari_writer import DatasetWriter, Episode
from worldsim.evaluation.realism import (
    RealismEvalConfig,
    codec_features,
    evaluate_realism,
    format_table,
    frechet_distance,
    random_walk_actions,
)
from worldsim.evaluation.metrics import MAZE_BORDER, sharpness
from tiny_world import save_tiny_run


@pytest.fixture(scope="module")
def maze_frames():
    """120 real 64x64 frames of a random walk in the 9x9 maze (uint8 (N, 64, 64, 3))."""
    env = gym.make("worldsim/MemoryMaze-9x9-v0")
    obs, _ = env.reset(seed=3)
    actions = random_walk_actions(6, 1, 120, 0.8, np.random.default_rng(0))[0]
    frames = [obs]
    for a in actions[:-1]:
        obs, *_ = env.step(int(a))
        frames.append(obs)
    env.close()
    return torch.as_tensor(np.stack(frames))


def blur(frames: torch.Tensor, k: int = 5) -> torch.Tensor:
    x = frames.permute(0, 3, 1, 2).float()
    x = F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="replicate"), k, stride=1)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def test_sharpness_ranks_blur_below_the_original(maze_frames):
    original = sharpness(maze_frames)
    blurred = sharpness(blur(maze_frames))
    assert original.shape == (len(maze_frames),) and (original > 0).all()
    assert (blurred < original).all()
    assert blurred.mean() < 0.6 * original.mean()
    # Real frames against other real frames of the same maze: a ratio near 1.
    ratio = sharpness(maze_frames[::2]).mean() / sharpness(maze_frames[1::2]).mean()
    assert 0.85 < ratio < 1.15


def test_sharpness_ignores_the_border_and_checks_its_input():
    frames = torch.zeros(2, 16, 16, 3, dtype=torch.uint8)
    frames[:, :2] = 255  # a bright edge inside the border only
    assert torch.equal(sharpness(frames, border=2), torch.zeros(2, dtype=torch.float64))
    assert sharpness(frames, border=0).min() > 0
    with pytest.raises(ValueError, match="uint8"):
        sharpness(frames.float())
    with pytest.raises(ValueError, match="interior"):
        sharpness(frames, border=8)
    # The realism config repeats the default as a literal (the CLI reads defaults from the source).
    assert RealismEvalConfig(checkpoint="m", dataset="d").border == MAZE_BORDER


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_blur(maze_frames):
    torch.manual_seed(0)
    codec = FrameCodec(preset("tiny")).eval()
    real = codec_features(codec, maze_frames)
    assert real.shape[0] == len(maze_frames)
    assert frechet_distance(real, real) == pytest.approx(0, abs=1e-6)
    halves = frechet_distance(real[::2], real[1::2])
    blurred = frechet_distance(codec_features(codec, blur(maze_frames[::2])), real[1::2])
    assert blurred > 2 * halves
    # Exact for Gaussians with known moments: shifted means only.
    a = torch.randn(4000, 3, dtype=torch.float64)
    assert frechet_distance(a, a + torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)) == pytest.approx(5.0, rel=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(a, a[:, :2])


def test_random_walk_actions_persist():
    a = random_walk_actions(6, 4, 2000, 0.8, np.random.default_rng(0))
    assert a.shape == (4, 2000) and a.min() >= 0 and a.max() <= 5
    repeats = (a[:, 1:] == a[:, :-1]).mean()
    assert 0.8 < repeats < 0.9  # p + (1 - p) / 6 = 0.833


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("realism")
    save_tiny_run(root)
    rng = np.random.default_rng(1)
    writer = DatasetWriter("eval/realism-v0", gym.spaces.Box(0, 255, (64, 64, 3), np.uint8), gym.spaces.Discrete(6),
                           root=root / "data")
    for n in (15, 12):
        frames = rng.integers(0, 256, (n + 1, 64, 64, 3), dtype=np.uint8)
        no = np.zeros(n, bool)
        writer.append(Episode(frames, rng.integers(0, 6, n), np.zeros(n), no, no))
    return root / "run", writer.path


def test_evaluation_end_to_end_and_cli(setup):
    run, data = setup
    cfg = RealismEvalConfig(checkpoint=str(run), dataset=str(data), steps=12, streams=3, context=3,
                            buckets=((1, 4), (8, 20), (30, 40)), reference_frames=20, sampler_steps=1, device="cpu")
    results = evaluate_realism(cfg)
    assert [(b["first"], b["last"]) for b in results["buckets"]] == [(1, 4), (8, 12)]  # clipped, dropped
    assert [b["frames"] for b in results["buckets"]] == [12, 15]
    ref = results["reference"]
    assert ref["frames"] == 20 and ref["sharpness_real"] > 0
    for b in results["buckets"]:
        assert b["sharpness_vs_real"] == pytest.approx(b["sharpness"] / ref["sharpness_real"])
        assert b["sharpness_vs_codec"] == pytest.approx(b["sharpness"] / ref["sharpness_codec"])
        assert b["frechet"] >= 0
    again = evaluate_realism(cfg)
    assert again["buckets"] == results["buckets"]  # seeded: the same dreams
    assert "1-4" in format_table(results)
    json.dumps(results, allow_nan=False)

    out = CliRunner().invoke(eval_app, ["realism", "--checkpoint", str(run), "--dataset", str(data), "--steps", "6",
                                        "--streams", "2", "--context", "3", "--bucket", "1-6", "--reference-frames",
                                        "10", "--sampler-steps", "1", "--device", "cpu", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["buckets"][0]["frames"] == 12
    bad = CliRunner().invoke(eval_app, ["realism", "--checkpoint", str(run), "--dataset", str(data), "--bucket", "x"])
    assert bad.exit_code != 0 and "FIRST-LAST" in bad.output
    tuned = CliRunner().invoke(eval_app, ["realism", "--checkpoint", str(run), "--dataset", str(data), "--steps", "3",
                                          "--streams", "1", "--context", "3", "--bucket", "1-3", "--reference-frames", "4",
                                          "--sampler-steps", "2", "--sigma-max", "20", "--solver", "euler", "--churn", "0.5",
                                          "--final-extrapolation", "0.3", "--json"])
    assert tuned.exit_code == 0, tuned.output
    assert json.loads(tuned.output)["config"]["sampler"] == {"sigma_max": 20.0, "solver": "euler", "churn": 0.5,
                                                             "final_extrapolation": 0.3}
    negative = CliRunner().invoke(eval_app, ["realism", "--checkpoint", str(run), "--dataset", str(data),
                                             "--final-extrapolation", "-1"])
    assert negative.exit_code != 0 and "final-extrapolation" in negative.output
    negative = CliRunner().invoke(eval_app, ["realism", "--checkpoint", str(run), "--dataset", str(data), "--churn", "-1"])
    assert negative.exit_code != 0 and "churn" in negative.output
    wrong = CliRunner().invoke(eval_app, ["realism", "--checkpoint", str(run), "--dataset", str(data), "--solver", "rk4"])
    assert wrong.exit_code != 0 and "rk4" in wrong.output
