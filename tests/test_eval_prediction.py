"""`worldsim eval prediction` with a real tiny world model and codec (random init) saved as
checkpoints, on a small Minari dataset written with DatasetWriter."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from worldsim.codec.autoencoder import psnr
from worldsim.codec.checkpoint import load_codec
from worldsim.commands.evaluate import eval_app
from worldsim.data.episode_store import EpisodeStore
from worldsim.data.minari_writer import DatasetWriter, Episode
from worldsim.evaluation.metrics import sharpness
from worldsim.evaluation.prediction import (
    PredictionEvalConfig,
    Window,
    evaluate_prediction,
    format_table,
    read_windows,
    real_backbone_step,
    real_direct_path_step,
    teacher_forced_step,
)
from tiny_world import save_run, save_tiny_run, tiny_parts

EPISODE_STEPS = (20, 14, 6)  # the last one is shorter than context + horizon below
CONTEXT, HORIZON, STARTS = 3, 5, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(world-model run folder, codec folder, dataset folder)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evalpred")
    save_tiny_run(root)
    codec_dir = root / "codec"

    rng = np.random.default_rng(1)
    writer = DatasetWriter("eval/pred-v0", gym.spaces.Box(0, 255, (64, 64, 3), np.uint8), gym.spaces.Discrete(6),
                           root=root / "data")
    for n in EPISODE_STEPS:
        # A smooth moving gradient (not noise), so copy-last and the codec give distinct, finite PSNRs.
        x = np.arange(64)[None, :, None] + 3 * np.arange(n + 1)[:, None, None]
        frames = np.broadcast_to((x * 4 % 256)[:, :, :, None], (n + 1, 64, 64, 3)).astype(np.uint8)
        frames = np.ascontiguousarray(frames)
        frames[..., 1] = rng.integers(0, 256, (n + 1, 1, 1), dtype=np.uint8)  # per-frame green level
        no = np.zeros(n, bool)
        writer.append(Episode(frames, rng.integers(0, 6, n), np.zeros(n), no, no))
    return root / "run", codec_dir, writer.path


def _cfg(setup, **kw) -> PredictionEvalConfig:
    run, _, data = setup
    base = dict(checkpoint=str(run), dataset=str(data), context=CONTEXT, horizon=HORIZON,
                starts_per_episode=STARTS, sampler_steps=1, seed=7, device="cpu")
    return PredictionEvalConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def results(setup):
    return evaluate_prediction(_cfg(setup))


def test_shapes_and_counts(results):
    psnr_ = results["psnr"]
    assert results["windows"] == 2 * STARTS and results["episodes"] == 2
    assert results["episodes_too_short"] == [2]  # 6 steps < 3 + 5
    assert set(psnr_) == {"teacher_forced", "open_loop", "codec", "copy_last", "copy_previous"}
    for s in psnr_.values():
        assert len(s["curve"]) == HORIZON and list(s["at"]) == ["1", "4", "5"]  # 16 > horizon: the horizon instead
        assert s["at"]["1"] == s["curve"][0] and s["at"]["5"] == s["curve"][-1]
        assert np.isclose(s["mean"], np.mean(s["curve"])) and s["sem"] >= 0
    for ep, start in results["starts"]:  # every window fits its episode
        assert 0 <= start and start + CONTEXT + HORIZON <= EPISODE_STEPS[ep]
    assert len({tuple(s) for s in results["starts"]}) == results["windows"]  # no repeated start
    table = format_table(results)
    assert "open loop" in table and "copy last" in table and "t=4" in table and "skipped 1 episodes" in table
    json.dumps(results, allow_nan=False)  # plain JSON


def _direct_windows(setup, results):
    store = EpisodeStore(setup[2])
    frames = np.stack([store.read(ep, start, CONTEXT + HORIZON)["frames"] for ep, start in results["starts"]])
    return torch.as_tensor(frames)  # (N, C + H, 64, 64, 3)


def test_copy_last_baseline_equals_a_direct_computation(setup, results):
    frames = _direct_windows(setup, results)
    targets, last = frames[:, CONTEXT:], frames[:, CONTEXT - 1]
    expect = np.stack([psnr(targets[:, t], last).numpy() for t in range(HORIZON)], axis=1)  # (N, H)
    got = results["psnr"]["copy_last"]
    assert np.allclose(got["curve"], expect.mean(axis=0), atol=1e-4)
    assert np.isclose(got["mean"], expect.mean(), atol=1e-4)
    assert got["at"]["1"] > got["at"]["5"]  # the gradient drifts: copying gets worse with distance


def test_copy_previous_baseline_equals_a_direct_computation(setup, results):
    frames = _direct_windows(setup, results)
    expect = np.stack([psnr(frames[:, CONTEXT + t], frames[:, CONTEXT + t - 1]).numpy() for t in range(HORIZON)], axis=1)
    got = results["psnr"]["copy_previous"]
    assert np.allclose(got["curve"], expect.mean(axis=0), atol=1e-4)
    assert np.isclose(got["at"]["1"], results["psnr"]["copy_last"]["at"]["1"])  # t = 1: the same frame


def _targets_and_reconstructions(setup, results) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows' target frames and the codec's reconstructions of them, (N * H, 64, 64, 3) each."""
    targets = _direct_windows(setup, results)[:, CONTEXT:].flatten(0, 1)
    codec = load_codec(setup[1])
    with torch.no_grad():
        return targets, codec.decode(codec.encode(targets), as_uint8=True)


def test_codec_ceiling_equals_psnr_of_its_reconstruction(setup, results):
    targets, recon = _targets_and_reconstructions(setup, results)
    expect = psnr(targets, recon).reshape(-1, HORIZON).numpy()
    got = results["psnr"]["codec"]
    assert np.allclose(got["curve"], expect.mean(axis=0), atol=1e-4)
    assert np.isclose(got["mean"], expect.mean(), atol=1e-4)


def test_sharpness_is_a_share_of_the_real_targets(setup, results):
    """Each model row's sharpness is its frames' gradient energy over the real targets', per step
    (ratio of the means over windows); the codec row equals a direct computation, the copy
    baselines (real frames) get none, and step 1 is the same frame for both loops."""
    targets, recon = _targets_and_reconstructions(setup, results)
    real = sharpness(targets).reshape(-1, HORIZON).numpy()
    ceiling = sharpness(recon).reshape(-1, HORIZON).numpy()
    got = results["sharpness"]
    assert set(got) == {"teacher_forced", "open_loop", "codec"}
    assert np.allclose(got["codec"]["curve"], ceiling.mean(axis=0) / real.mean(axis=0), rtol=1e-6)
    assert np.isclose(got["codec"]["mean"], ceiling.mean() / real.mean(), rtol=1e-6)
    assert np.isclose(results["sharpness_real"], real.mean(), rtol=1e-6)
    assert got["teacher_forced"]["curve"][0] == got["open_loop"]["curve"][0]
    assert all(x >= 0 for s in got.values() for x in s["curve"]) and list(got["codec"]["at"]) == ["1", "4", "5"]
    assert "sharpness, share of the real targets'" in format_table(results)


def test_same_seed_same_numbers_other_seed_other_starts(setup, results):
    again = evaluate_prediction(_cfg(setup))
    for key in ("psnr", "starts", "windows"):
        assert again[key] == results[key]
    other = evaluate_prediction(_cfg(setup, seed=8))
    assert other["starts"] != results["starts"] or other["psnr"]["open_loop"] != results["psnr"]["open_loop"]


def test_teacher_forcing_and_open_loop_share_step_one_then_diverge(setup, results):
    """Both start from the same cache and noise: the first prediction is the same frame; later the
    teacher-forced model sees real frames the open-loop one never saw."""
    tf, ol = results["psnr"]["teacher_forced"], results["psnr"]["open_loop"]
    assert tf["curve"][0] == ol["curve"][0]
    assert tf["curve"][1:] != ol["curve"][1:]


def test_teacher_forcing_commits_the_real_frames(setup):
    """After k teacher-forced steps the cache must be the one a prefill over the context plus the
    first k real targets builds: the real frames were committed, not the predictions."""
    from worldsim.envs.dream import load_dream_model
    from worldsim.rollout.session import RolloutSession

    model, codec = load_dream_model(setup[0])
    store = EpisodeStore(setup[2])
    frames, actions = read_windows(store, [Window(0, 4, 0)], CONTEXT + HORIZON)
    k = 2
    forced = RolloutSession(model, codec, batch=1, sampler_steps=1)
    forced.reset(frames[:, :CONTEXT], actions[:, : CONTEXT - 1], seeds=[3])
    real = codec.encode(torch.as_tensor(frames[:, CONTEXT:]))
    acts = torch.as_tensor(actions[:, CONTEXT - 1:])
    predicted = [teacher_forced_step(forced, acts[:, t], real[:, t]) for t in range(k)]
    assert not torch.allclose(predicted[0], real[:, 0], atol=1e-3)  # the prediction is not the real frame
    prefilled = RolloutSession(model, codec, batch=1, sampler_steps=1)
    prefilled.reset(frames[:, : CONTEXT + k], actions[:, : CONTEXT + k - 1], seeds=[3])

    # Probe both caches with the same non-committing denoiser call on the next frame.
    x, sigma = torch.randn(1, *real.shape[2:], generator=torch.Generator().manual_seed(0)), torch.ones(1)
    with torch.no_grad():
        a = model.step(x, sigma, acts[:, k], forced.cache, commit=False).denoised
        b = model.step(x, sigma, acts[:, k], prefilled.cache, commit=False).denoised
    assert torch.allclose(a, b, atol=1e-4)  # streamed commits vs parallel prefill: equal up to float error
    assert forced.cache.frames_seen == prefilled.cache.frames_seen == CONTEXT + k


def test_batch_size_does_not_change_the_results(setup, results):
    small = evaluate_prediction(_cfg(setup, batch_size=3))
    for key in ("teacher_forced", "open_loop", "codec", "copy_last"):
        assert np.allclose(small["psnr"][key]["curve"], results["psnr"][key]["curve"], atol=0.05)


def test_horizon_longer_than_every_episode_is_a_clear_error(setup):
    with pytest.raises(ValueError, match=r"horizon 40 = 43 steps.*20, 14, 6"):
        evaluate_prediction(_cfg(setup, horizon=40))
    with pytest.raises(ValueError, match="horizon must be >= 1"):
        evaluate_prediction(_cfg(setup, horizon=0))


def test_cli_prints_table_and_json(setup):
    run, _, data = setup
    app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    args = ["eval", "prediction", "--checkpoint", str(run), "--dataset", str(data), "--context", str(CONTEXT),
            "--horizon", "2", "--starts-per-episode", "1", "--sampler-steps", "1", "--episodes", "1", "--device", "cpu"]
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "1-step (teacher-forced)" in table.output and "codec ceiling" in table.output
    out = CliRunner().invoke(app, [*args, "--json"])
    assert out.exit_code == 0, out.output
    parsed = json.loads(out.stdout)
    assert parsed["windows"] == 1 and parsed["episodes"] == 1 and parsed["psnr"]["open_loop"]["sem"] is None
    bad = CliRunner().invoke(app, [*args[:-2], "--horizon", "99"])
    assert bad.exit_code == 2 and "lower --horizon" in bad.output


def test_dataset_the_model_cannot_take_is_a_clear_error(setup, tmp_path):
    writer = DatasetWriter("eval/five-v0", gym.spaces.Box(0, 255, (64, 64, 3), np.uint8), gym.spaces.Discrete(5),
                           root=tmp_path)
    no = np.zeros(12, bool)
    writer.append(Episode(np.zeros((13, 64, 64, 3), np.uint8), np.zeros(12, np.int64), np.zeros(12), no, no))
    with pytest.raises(ValueError, match=r"Discrete\(5\).*Discrete\(6\)"):
        evaluate_prediction(_cfg(setup, dataset=str(writer.path)))


def test_cli_out_dir_writes_json_and_png_plot(setup, tmp_path):
    from PIL import Image

    run, _, data = setup
    app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    out_dir = tmp_path / "pred"
    result = CliRunner().invoke(app, ["eval", "prediction", "--checkpoint", str(run), "--dataset", str(data),
                                      "--context", str(CONTEXT), "--horizon", "3", "--starts-per-episode", "1",
                                      "--sampler-steps", "1", "--episodes", "1", "--device", "cpu",
                                      "--out-dir", str(out_dir)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out_dir / "prediction.json").read_text())
    assert saved["windows"] == 1 and len(saved["psnr"]["open_loop"]["curve"]) == 3
    assert saved["plot"] == str(out_dir / "prediction.png") and str(out_dir / "prediction.png") in result.output
    with Image.open(out_dir / "prediction.png") as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 5  # lines in several colours, not a blank page
    assert not list(out_dir.glob(".*tmp*"))


@pytest.fixture(scope="module")
def direct_run(setup, tmp_path_factory):
    """A tiny run with a direct path (prev_frames = 2), on the same codec and data."""
    model, codec = tiny_parts(seed=0, prev_frames=2)
    return save_run(tmp_path_factory.mktemp("direct") / "run", model, setup[1], codec)


def _probe(model, session, action):
    x = torch.randn(1, *session.latents.shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.step(x, torch.ones(1), action, session.cache, commit=False).denoised


def test_half_open_loops_feed_each_route_what_they_say(setup, direct_run):
    """real_direct_path_step commits the dream to the backbone and shows the direct path the real
    frame; real_backbone_step the other way round. Checked against the plain open loop and the
    teacher-forced step from the same cache: the backbone caches agree where they should (a probe
    gives the same output once the direct paths are made equal) and the direct paths differ."""
    from worldsim.envs.dream import load_dream_model
    from worldsim.rollout.session import RolloutSession

    model, codec = load_dream_model(direct_run)
    frames, actions = read_windows(EpisodeStore(setup[2]), [Window(0, 4, 0)], CONTEXT + HORIZON)
    real = codec.encode(torch.as_tensor(frames[:, CONTEXT:]))[:, 0]
    act = torch.as_tensor(actions[:, CONTEXT - 1])
    base = RolloutSession(model, codec, batch=1, sampler_steps=1)
    base.reset(frames[:, :CONTEXT], actions[:, : CONTEXT - 1], seeds=[3])
    dream, real_direct, forced, real_backbone = (base.select([0]) for _ in range(4))

    predicted = dream.step(act, decode=False).latents
    assert torch.equal(real_direct_path_step(real_direct, act, real), predicted)  # same noise: same sample
    assert torch.equal(teacher_forced_step(forced, act, real), predicted)
    assert torch.equal(real_backbone_step(real_backbone, act, real), predicted)
    assert not torch.allclose(predicted, real, atol=1e-3)

    nxt = torch.as_tensor(actions[:, CONTEXT])
    # The direct path: what each was shown of the last frame.
    assert torch.equal(real_direct.cache.recent[:, -1], real) and torch.equal(real_backbone.cache.recent[:, -1], predicted)
    assert not torch.allclose(_probe(model, real_direct, nxt), _probe(model, dream, nxt), atol=1e-5)
    # The backbone: with the direct paths made equal, the probes agree pairwise.
    real_direct.show_direct_path(predicted)
    torch.testing.assert_close(_probe(model, real_direct, nxt), _probe(model, dream, nxt))
    real_backbone.show_direct_path(real)
    torch.testing.assert_close(_probe(model, real_backbone, nxt), _probe(model, forced, nxt))


def test_pathways_rows_in_the_evaluation(setup, direct_run):
    results = evaluate_prediction(_cfg(setup, checkpoint=str(direct_run), pathways=True))
    psnr = results["psnr"]
    first = {psnr[k]["curve"][0] for k in ("teacher_forced", "open_loop", "real_direct_path", "real_backbone")}
    assert len(first) == 1  # t = 1: one and the same sample in every row
    table = format_table(results)
    assert "open loop, real direct path" in table and "open loop, real backbone" in table
    with pytest.raises(ValueError, match="pathways needs a model with a direct path"):
        evaluate_prediction(_cfg(setup, pathways=True))


def test_show_direct_path_checks_its_input(setup, direct_run):
    from worldsim.envs.dream import load_dream_model
    from worldsim.rollout.session import RolloutSession

    frames, actions = read_windows(EpisodeStore(setup[2]), [Window(0, 4, 0)], CONTEXT)
    for run in (direct_run, setup[0]):
        model, codec = load_dream_model(run)
        session = RolloutSession(model, codec, batch=1, sampler_steps=1)
        session.reset(frames, actions[:, : CONTEXT - 1], seeds=[0])
        if run == direct_run:
            with pytest.raises(ValueError, match="direct-path latents must have shape"):
                session.show_direct_path(torch.zeros(2, *session.latents.shape[1:]))
        else:
            with pytest.raises(ValueError, match="no direct path"):
                session.show_direct_path(session.latents)
