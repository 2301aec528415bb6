"""`worldsim eval memory` with two real tiny world models (an lssvwm and a causal_window baseline,
random init) saved as checkpoints, on a small Minari dataset with revisit metadata and poses."""

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from worldsim.data.revisits import find_revisits
from worldsim.codec.autoencoder import FrameCodec, preset
from worldsim.codec.checkpoint import save_codec
from worldsim.commands.evaluate import eval_app
from worldsim.data.episode_store import EpisodeStore
from worldsim.data.minari_writer import DatasetWriter, Episode
from worldsim.evaluation.memory import MemoryEvalConfig, bucket_of, evaluate_memory, format_table, prefill_session
from worldsim.evaluation.metrics import psnr, ssim
from tiny_world import save_run, tiny_model

WINDOWS = {"lssvwm": 3, "causal_window": 4}  # the widest (4) is the qualifying gap
CONTEXT, HORIZON, EDGES = 12, 3, (4, 8, 16)
EPISODE_STEPS = (30, 26)
REVISITS = (
    [[16, 6], [20, 17], [25, 20], [10, 2], [29, 25], [28, 20], [29, 5]],
    [[20, 14]],
)
# Episode 0: (16, 6) gap 10 and (25, 20) gap 5 qualify; (20, 17) gap 3 and (29, 25) gap 4 (= the window)
# are within the window; (10, 2) starts before the episode; (28, 20) ends after it; (29, 5) gap 24 > context.
QUALIFYING = [[0, 16, 6], [0, 25, 20], [1, 20, 14]]


def _poses(n: int, loop: bool) -> tuple[np.ndarray, np.ndarray]:
    """Heading east throughout. loop: 5 steps on a row of their own, then a 10-cell circuit, so the
    first return is at step 15 to the pose of step 5 (gap 10)."""
    t = np.arange(n + 1)
    pos = np.stack([t, np.zeros_like(t)], 1).astype(float)
    if loop:
        pos = np.where(t[:, None] < 5, np.stack([t, np.full_like(t, 5)], 1), np.stack([(t - 5) % 10, 0 * t], 1)).astype(float)
    return pos, np.tile([1.0, 0.0], (n + 1, 1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoints {label: run folder}, dataset folder)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("evalmem")
    codec = FrameCodec(preset("tiny")).eval()
    codec_dir = save_codec(codec, root / "codec")
    runs = {}
    for variant, window in WINDOWS.items():
        model = tiny_model(variant=variant, attn_window=window)
        runs[variant] = str(save_run(root / variant, model, codec_dir, codec))

    rng = np.random.default_rng(1)
    writer = DatasetWriter("eval/mem-v0", gym.spaces.Box(0, 255, (64, 64, 3), np.uint8), gym.spaces.Discrete(6),
                           root=root / "data")
    for ep, (n, revisits) in enumerate(zip(EPISODE_STEPS, REVISITS)):
        x = np.arange(64)[None, :, None] + 3 * np.arange(n + 1)[:, None, None]  # a drifting gradient
        frames = np.ascontiguousarray(np.broadcast_to((x * 4 % 256)[:, :, :, None], (n + 1, 64, 64, 3)).astype(np.uint8))
        frames[..., 1] = rng.integers(0, 256, (n + 1, 1, 1), dtype=np.uint8)
        pos, heading = _poses(n, loop=ep == 0)
        no = np.zeros(n, bool)
        writer.append(Episode(frames, rng.integers(0, 6, n), np.zeros(n), no, no,
                              infos={"agent_pos": pos, "agent_dir": heading}, metadata={"revisits": revisits}))
    return runs, writer.path


def _cfg(setup, tmp_path=None, **kw) -> MemoryEvalConfig:
    runs, data = setup
    base = dict(checkpoints=runs, dataset=str(data), context=CONTEXT, horizon=HORIZON, gap_edges=EDGES,
                sampler_steps=1, seed=3, batch_size=4, prefill_chunk=5, device="cpu",
                out_dir=None if tmp_path is None else str(tmp_path))
    return MemoryEvalConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def results(setup, tmp_path_factory):
    return evaluate_memory(_cfg(setup, tmp_path_factory.mktemp("out")))


# ------------------------------------------------------------------------------ metrics
def test_ssim_is_one_on_equal_frames_and_falls_with_noise():
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    assert torch.allclose(ssim(x, x), torch.ones(1, dtype=torch.float64))
    scores = []
    for level in (5, 20, 60):
        noisy = (x.double() + torch.as_tensor(rng.normal(0, level, x.shape))).clamp(0, 255).round().to(torch.uint8)
        scores.append(float(ssim(x, noisy)[0]))
    assert 1 > scores[0] > scores[1] > scores[2]


def test_ssim_of_flat_frames_is_the_luminance_term():
    """Flat frames have no variance: SSIM = (2ab + C1) / (a^2 + b^2 + C1) exactly."""
    a, b = 100.0, 140.0
    x, y = torch.full((1, 16, 16, 3), int(a), dtype=torch.uint8), torch.full((1, 16, 16, 3), int(b), dtype=torch.uint8)
    c1 = (0.01 * 255) ** 2
    assert math.isclose(float(ssim(x, y)[0]), (2 * a * b + c1) / (a * a + b * b + c1), rel_tol=1e-9)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[:, :8, :8], y[:, :8, :8])


def test_psnr_of_a_known_pair():
    x = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    y = x.clone()
    y[0] += 10  # MSE 100
    got = psnr(x, y)
    assert math.isclose(float(got[0]), 10 * math.log10(255**2 / 100), rel_tol=1e-6)
    assert float(got[1]) == pytest.approx(100.0)  # identical frames: the cap


# ------------------------------------------------------------------------------ targets and buckets
def test_targets_buckets_and_exclusions(results):
    rev = results["protocols"]["revisits"]
    assert results["qualifying_gap"] == 4 and results["attention_windows"] == WINDOWS
    assert rev["pairs"] == QUALIFYING and rev["targets"] == 3 and rev["candidates"] == 8
    assert rev["excluded"] == {"within_window": 2, "beyond_context": 1, "too_close_to_start": 1, "too_close_to_end": 1}
    for label in WINDOWS:
        s = rev["models"][label]
        assert s["count"] == 3
        assert [(b["gap_min"], b["gap_max"], b["count"]) for b in s["buckets"]] == [(4, 8, 2), (8, 16, 1)]
        assert s["buckets"][0]["mean_gap"] == 5.5 and s["buckets"][1]["psnr"]["sem"] is None  # one target
        assert 0 < s["psnr"]["mean"] < 100 and -1 <= s["ssim"]["mean"] < 1
    assert bucket_of(3, EDGES) == (0, 4) and bucket_of(16, EDGES) == (16, None) and bucket_of(8, EDGES) == (8, 16)


def test_retrieval_targets_are_the_returns_found_in_the_poses(setup, results):
    pos, heading = _poses(EPISODE_STEPS[0], loop=True)
    assert find_revisits(pos, heading, min_gap=5) == [(15, 5)]
    ret = results["protocols"]["retrieval"]
    assert ret["pairs"] == [[0, 15, 5]] and ret["excluded"]["within_window"] == 0


def test_references_equal_a_direct_computation(setup, results):
    store = EpisodeStore(setup[1])
    rev = results["protocols"]["revisits"]
    copy_last, earlier = [], []
    for ep, t_now, t_before in rev["pairs"]:
        frames = torch.as_tensor(store.read(ep, t_before, t_now + HORIZON - t_before)["frames"])
        real, gap = frames[-HORIZON:], t_now - t_before
        copy_last.append(float(psnr(real, frames[gap - 1 : gap].expand_as(real)).mean()))
        earlier.append(float(ssim(real, frames[:HORIZON]).mean()))
    refs = rev["references"]
    assert np.isclose(refs["copy_last"]["psnr"]["mean"], np.mean(copy_last))
    assert np.isclose(refs["copy_last"]["buckets"][1]["psnr"]["mean"], copy_last[0])  # gap 10: the only one in [8, 16)
    assert np.isclose(refs["earlier_visit"]["ssim"]["mean"], np.mean(earlier))


def test_models_differ_and_same_seed_gives_same_numbers(setup, results):
    rev = results["protocols"]["revisits"]["models"]
    assert rev["lssvwm"]["psnr"] != rev["causal_window"]["psnr"]
    again = evaluate_memory(_cfg(setup, protocols=("revisits",), batch_size=2))  # other batching too
    for label in WINDOWS:
        a, b = again["protocols"]["revisits"]["models"][label], rev[label]
        assert np.isclose(a["psnr"]["mean"], b["psnr"]["mean"], atol=0.05)
        assert np.isclose(a["ssim"]["mean"], b["ssim"]["mean"], atol=1e-3)


def test_the_first_model_minus_each_other_is_paired_per_target(results):
    block = results["protocols"]["revisits"]
    first, *others = block["models"]
    assert set(block["first_minus"]) == set(others) and others
    for label in others:  # the paired mean is the difference of the means; its s.e.m. is the difference's
        diff = block["first_minus"][label]["psnr"]
        assert np.isclose(diff["mean"], block["models"][first]["psnr"]["mean"] - block["models"][label]["psnr"]["mean"])
        assert diff["sem"] is not None and diff["sem"] >= 0
    assert f"{first} - {others[0]}" in format_table(results)


def test_the_table_says_when_the_earlier_visits_cannot_reward_memory(results):
    import copy

    edited = copy.deepcopy(results)
    refs = edited["protocols"]["retrieval"]["references"]
    refs["earlier_visit"]["psnr"]["mean"] = refs["copy_last"]["psnr"]["mean"] + 3.0
    assert "leave little for memory" not in format_table(edited).split("retrieval:")[1]
    refs["earlier_visit"]["psnr"]["mean"] = refs["copy_last"]["psnr"]["mean"] - 0.5
    assert "leave little for memory to gain (tighter --pos-tol" in format_table(edited).split("retrieval:")[1]


def test_window_only_rows_score_the_last_window_of_context(setup, results):
    ablated = evaluate_memory(_cfg(setup, protocols=("revisits",), window_only=True))
    full, rows = results["protocols"]["revisits"]["models"], ablated["protocols"]["revisits"]["models"]
    assert set(rows) == {*WINDOWS, *(f"{label}, window only" for label in WINDOWS)}
    for label in WINDOWS:  # the full-context rows are the same runs as without the ablation
        assert np.isclose(rows[label]["psnr"]["mean"], full[label]["psnr"]["mean"], atol=0.05)
    assert "lssvwm, window only" in format_table(ablated) and "lssvwm full - window" in format_table(ablated)
    gain = ablated["protocols"]["revisits"]["window_only_gain"]
    assert set(gain) == set(WINDOWS)
    for label in WINDOWS:  # the paired mean is the difference of the rows' means
        expected = rows[label]["psnr"]["mean"] - rows[f"{label}, window only"]["psnr"]["mean"]
        assert np.isclose(gain[label]["psnr"]["mean"], expected, atol=1e-6)
        assert [b["count"] for b in gain[label]["buckets"]] == [b["count"] for b in rows[label]["buckets"]]
    assert "window_only_gain" not in results["protocols"]["revisits"]


def test_a_foreign_past_controls_for_a_warmed_up_state(setup, results):
    """The control: the context's length kept, the frames before each model's window lent by a
    target of another episode. A sliding window cannot tell (it never sees them); the LSSVWM's
    state can, and its full-minus-foreign row is the paired difference."""
    controlled = evaluate_memory(_cfg(setup, protocols=("revisits",), foreign_past=True))
    block = controlled["protocols"]["revisits"]
    rows, full = block["models"], results["protocols"]["revisits"]["models"]
    assert set(rows) == {*WINDOWS, *(f"{label}, foreign past" for label in WINDOWS)}
    assert np.isclose(rows["causal_window, foreign past"]["psnr"]["mean"], full["causal_window"]["psnr"]["mean"], atol=1e-3)
    gain = block["foreign_past_gain"]
    assert set(gain) == set(WINDOWS) and "window_only_gain" not in block
    expected = rows["lssvwm"]["psnr"]["mean"] - rows["lssvwm, foreign past"]["psnr"]["mean"]
    assert np.isclose(gain["lssvwm"]["psnr"]["mean"], expected, atol=1e-6)
    table = format_table(controlled)
    assert "lssvwm full - foreign" in table and "foreign past: the same context length, all but the last frames (lssvwm 3" in table
    assert "window only: the last context frames kept" not in table


def test_the_foreign_past_comes_from_another_episode_and_keeps_the_own_action_into_the_window():
    from worldsim.evaluation.memory import Target, foreign_donors, splice_past

    targets = [Target(0, 20, 5), Target(0, 30, 9), Target(1, 25, 3), Target(0, 40, 12)]
    donors = foreign_donors(targets)
    assert [d.episode for d in donors] == [1, 1, 0, 1] and donors[2] is targets[3]
    with pytest.raises(ValueError, match="at least two episodes"):
        foreign_donors(targets[:2])
    frames, lent = np.zeros((1, 6, 2, 2, 3), np.uint8), np.full((1, 4, 2, 2, 3), 9, np.uint8)
    actions, lent_actions = np.arange(5)[None], 10 + np.arange(3)[None]
    seen, acts = splice_past(frames, actions, lent, lent_actions, cut=3)
    assert seen.shape == frames.shape and (seen[:, :3] == 9).all() and (seen[:, 3:] == 0).all()
    assert acts.tolist() == [[10, 11, 2, 3, 4]]  # lent between lent frames; its own into frame 3 on
    assert splice_past(frames, actions, lent, lent_actions, cut=0)[0] is frames


def _next_prediction_difference(run_dir: str, first: tuple, second: tuple) -> float:
    """Largest difference between a model's next-frame estimates (the same noisy input, sigma and
    action) after committing two contexts (frames (1, C, H, W, 3), actions (1, C - 1))."""
    from worldsim.envs.dream import load_dream_model

    model, codec = load_dream_model(run_dir)
    x, sigma = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.ones(1)
    with torch.no_grad():
        a, b = (model.step(x, sigma, torch.tensor([2]), prefill_session(model, codec, f, acts, [1], 1, chunk=CONTEXT).cache,
                           commit=False).denoised for f, acts in (first, second))
    return (a - b).abs().max().item()


def test_only_a_state_space_model_tells_a_foreign_past_from_its_own(setup):
    """What the control measures: frames from another episode, placed beyond the reach of a sliding
    window's attention stack (layers x window frames back), leave its next prediction exactly as it
    was, and change the LSSVWM's (its state carried them). Nearer than that, attention over
    attention reaches further back than one window: the `foreign_past` rows replace everything
    before the window, so their difference includes that route too."""
    from worldsim.evaluation.memory import attention_reach, splice_past
    from worldsim.train.checkpoint import load_world_model

    store = EpisodeStore(setup[1])
    own, other = store.read(0, 2, CONTEXT), store.read(1, 0, CONTEXT)
    frames, actions = own["frames"][None], own["actions"][None, : CONTEXT - 1]
    reach = attention_reach(load_world_model(setup[0]["causal_window"])[0].cfg)
    spliced = splice_past(frames, actions, other["frames"][None], other["actions"][None, : CONTEXT - 1], CONTEXT - reach)
    difference = {variant: _next_prediction_difference(setup[0][variant], (frames, actions), spliced) for variant in WINDOWS}
    assert difference["causal_window"] < 1e-6 and difference["lssvwm"] > 1e-4, difference


def test_a_model_without_a_window_is_ablated_at_the_widest_window_compared(setup, tmp_path):
    """mamba_only has no attention window: its window-only row keeps as many context frames as the
    widest finite window among the compared models, so its full-minus-window row asks what the
    LSSVWM's does."""
    from pathlib import Path

    from worldsim.evaluation.memory import ablation_window

    assert ablation_window({"a": 3, "b": None, "c": 4}, "b") == 4 and ablation_window({"a": 3, "c": 4}, "a") == 3
    assert ablation_window({"b": None}, "b") is None
    runs, data = setup
    model = tiny_model(variant="mamba_only")
    mamba = save_run(tmp_path / "mamba_only", model, Path(runs["lssvwm"]).parent / "codec", FrameCodec(preset("tiny")))
    ablated = evaluate_memory(_cfg(setup, checkpoints={"mamba_only": str(mamba), "lssvwm": runs["lssvwm"]},
                                   protocols=("revisits",), window_only=True, min_gap=WINDOWS["lssvwm"]))
    assert ablated["ablation_windows"] == {"mamba_only": WINDOWS["lssvwm"], "lssvwm": WINDOWS["lssvwm"]}
    block = ablated["protocols"]["revisits"]
    assert set(block["window_only_gain"]) == {"mamba_only", "lssvwm"}
    rows = block["models"]
    gain = rows["mamba_only"]["psnr"]["mean"] - rows["mamba_only, window only"]["psnr"]["mean"]
    assert np.isclose(block["window_only_gain"]["mamba_only"]["psnr"]["mean"], gain, atol=1e-6)
    assert gain != 0  # its state carried the older frames, so cutting them changes its dream
    assert "window only: the last context frames kept: mamba_only 3, lssvwm 3" in format_table(ablated)


def test_only_a_state_space_model_carries_anything_from_beyond_its_window(setup):
    """What the ablation measures: committing just the last W context frames leaves a sliding-window
    model's next prediction as it was up to rounding (it sees nothing older; its frame positions
    shift), and changes LSSVWM's (its state carried the older frames)."""
    steps = EpisodeStore(setup[1]).read(0, 2, CONTEXT)
    frames, actions = steps["frames"][None], steps["actions"][None, : CONTEXT - 1]
    difference = {variant: _next_prediction_difference(setup[0][variant], (frames, actions),
                                                       (frames[:, -w:], actions[:, -(w - 1):]))
                  for variant, w in WINDOWS.items()}
    assert difference["causal_window"] < 1e-3 and difference["lssvwm"] > 10 * difference["causal_window"], difference


def test_chunked_prefill_builds_the_one_shot_state(setup):
    from worldsim.envs.dream import load_dream_model

    model, codec = load_dream_model(setup[0]["lssvwm"])
    store = EpisodeStore(setup[1])
    steps = store.read(0, 2, CONTEXT)
    frames, actions = steps["frames"][None], steps["actions"][None, : CONTEXT - 1]
    chunked = prefill_session(model, codec, frames, actions, [1], 1, chunk=5)
    whole = prefill_session(model, codec, frames, actions, [1], 1, chunk=CONTEXT)
    x, sigma = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.ones(1)
    with torch.no_grad():
        a = model.step(x, sigma, torch.tensor([2]), chunked.cache, commit=False).denoised
        b = model.step(x, sigma, torch.tensor([2]), whole.cache, commit=False).denoised
    assert torch.allclose(a, b, atol=1e-4) and chunked.frames_seen == whole.frames_seen == CONTEXT
    assert torch.allclose(chunked.latents, whole.latents)


# ------------------------------------------------------------------------------ outputs
def test_json_and_png_are_written(results):
    import matplotlib.pyplot as plt

    from worldsim.evaluation.memory import window_markers

    # The plots mark each model's window and how far its attention stack reaches (tiny: 2 layers).
    assert results["attention_reach"] == {label: 2 * w for label, w in WINDOWS.items()}
    assert window_markers(results) == [("lssvwm", "window", 3), ("lssvwm", "attention reach", 6),
                                       ("causal_window", "window", 4), ("causal_window", "attention reach", 8)]

    with open(results["json"]) as f:
        assert json.load(f) == json.loads(json.dumps(results))  # the file is the results, plain JSON
    assert set(results["plots"]) == {"revisits", "retrieval"}
    for path in results["plots"].values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        image = plt.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    table = format_table(results)
    assert "lssvwm" in table and "copy_last (ref)" in table and "4-8" in table and "within_window 2" in table
    # Every model's state retention, measured in its first prefill: SSM heads for the LSSVWM, none for attention.
    retention = results["state_retention"]
    assert set(retention) == set(WINDOWS) and retention["causal_window"] == []
    assert [layer["layer"] for layer in retention["lssvwm"]] == list(range(len(retention["lssvwm"])))
    assert all(f is None or f > 0 for layer in retention["lssvwm"] for f in layer["frames_to_1e"])
    assert "state of lssvwm: " in table and "SSM heads keep 1/e" in table and "state of causal_window: no SSM layers" in table


# ------------------------------------------------------------------------------ errors and the CLI
def test_no_qualifying_revisit_is_a_clear_error(setup):
    with pytest.raises(ValueError, match=r"'revisits': no target qualifies out of 8.*within_window: 8"):
        evaluate_memory(_cfg(setup, protocols=("revisits",), min_gap=30))
    with pytest.raises(ValueError, match="inside the attention window"):
        evaluate_memory(_cfg(setup, min_gap=3))
    with pytest.raises(ValueError, match="protocols must be"):
        evaluate_memory(_cfg(setup, protocols=("nope",)))


def test_cli_json_and_error(setup, tmp_path):
    runs, data = setup
    app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    args = ["eval", "memory", "--checkpoint", f"lssvwm={runs['lssvwm']}", "--checkpoint", f"cw={runs['causal_window']}",
            "--dataset", str(data), "--protocol", "revisits", "--context", str(CONTEXT), "--horizon", "1",
            "--sampler-steps", "1", "--max-targets", "2", "--device", "cpu", "--out-dir", str(tmp_path)]
    out = CliRunner().invoke(app, [*args, "--json"])
    assert out.exit_code == 0, out.output
    parsed = json.loads(out.stdout)
    assert set(parsed["protocols"]["revisits"]["models"]) == {"lssvwm", "cw"}
    assert parsed["protocols"]["revisits"]["targets"] == 2 and (tmp_path / "memory_revisits.png").is_file()
    bad = CliRunner().invoke(app, [*args, "--context", "2"])
    assert bad.exit_code == 2 and "no target qualifies" in bad.output
