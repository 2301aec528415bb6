"""`worldsim bench rollout` end to end at tiny sizes (a random tiny model, and the bundled model it
measures by default), and the consistency of its numbers."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from worldsim.bench.rollout import RolloutBenchConfig, advance, format_table, random_parts, run
from worldsim.commands.bench import bench_app
from worldsim.rollout.session import RolloutSession

TINY = dict(preset="tiny", horizons=(8, 32), timed_frames=2, sampler_steps=1, batches=(1, 2), dream_steps=2,
            rounds=3, real_round_steps=5, breakdown_steps=2, real_steps=10, long_steps=12, rss_every=4, threads=1)


@pytest.fixture(scope="module")
def results():
    return run(RolloutBenchConfig(**TINY))


def test_state_bytes_flat_for_lssvwm_and_growing_for_causal(results):
    rows = {(r["variant"], r["horizon"]): r for r in results["horizons"]}
    assert rows["lssvwm", 8]["state_bytes"] == rows["lssvwm", 32]["state_bytes"]
    assert results["state_constant"] == {"lssvwm": True, "causal_full": False}
    # The causal KV cache holds every frame: its bytes are proportional to the horizon.
    assert rows["causal_full", 32]["state_bytes"] == 4 * rows["causal_full", 8]["state_bytes"]
    assert {r["advance"] for r in results["horizons"] if r["variant"] == "lssvwm"} == {"stream"}
    for r in results["horizons"]:
        assert 0 < r["ms_min"] <= r["ms_median"] and r["frames_seen"] == r["horizon"]
    ratio = results["latency_ratio"]["lssvwm"]
    assert ratio == pytest.approx(rows["lssvwm", 32]["ms_median"] / rows["lssvwm", 8]["ms_median"])


def check_breakdown(results):
    """The per-frame breakdown adds up: phases + other = total, frames/s and dream/real follow."""
    real = results["real"]
    assert [r["batch"] for r in results["breakdown"]] == list(results["config"]["batches"])
    for r in results["breakdown"]:
        assert min(r["denoise_ms"], r["commit_ms"], r["decode_ms"]) > 0 and r["other_ms"] > -1e-6
        assert r["denoise_ms"] + r["commit_ms"] + r["decode_ms"] + r["other_ms"] == pytest.approx(r["total_ms"])
        assert r["total_ms"] == pytest.approx(1e3 * r["seconds"] / r["steps"])
        assert r["frames_per_s"] == pytest.approx(r["batch"] * r["steps"] / r["seconds"])
        assert r["vs_real"] == pytest.approx(r["frames_per_s"] / real["steps_per_s"])
        assert r["vs_real_cpu"] == pytest.approx(r["frames_per_cpu_s"] / real["steps_per_cpu_s"])
    assert real["ms_per_step"] == pytest.approx(1e3 * real["seconds"] / real["steps"])
    table = format_table(results)
    assert "Per-frame breakdown" in table and "real env" in table


def test_dream_real_and_long_rollout_figures(results):
    assert [d["batch"] for d in results["dream"]] == [1, 2]
    for d in results["dream"]:
        key, rounds = str(d["batch"]), d["rounds"]
        assert d["steps"] == 2 * 3 and len(rounds) == 3
        assert d["frames_per_s"] == pytest.approx(d["batch"] * d["steps"] / d["seconds"])
        assert d["frames_per_cpu_s"] == pytest.approx(d["batch"] * d["steps"] / d["cpu_seconds"])
        assert d["seconds"] == pytest.approx(sum(r["seconds"] for r in rounds))
        # Each round's ratio is its own dream frames/s over the real env timed just before it.
        for r in rounds:
            assert r["real"]["steps"] == 5
            assert r["vs_real"] == pytest.approx(d["batch"] * 2 / r["seconds"] / r["real"]["steps_per_s"])
            assert r["vs_real_cpu"] == pytest.approx(d["batch"] * 2 / r["cpu_seconds"] / r["real"]["steps_per_cpu_s"])
        by_round = sorted(r["vs_real_cpu"] for r in rounds)
        assert results["dream_vs_real_cpu"][key] == pytest.approx(by_round[1])  # the median of 3
        assert results["dream_vs_real_cpu_range"][key] == pytest.approx((by_round[0], by_round[2]))
        assert results["dream_vs_real"][key] == pytest.approx(sorted(r["vs_real"] for r in rounds)[1])
    long = results["long"]
    assert [s["step"] for s in long["samples"]] == [4, 8, 12]
    assert long["nan_steps"] == 0 and long["first_nan_step"] is None
    assert long["state_bytes_start"] == long["state_bytes_first"] == long["state_bytes_last"]
    assert long["rss_max_growth"] == max(s["rss_bytes"] for s in long["samples"]) - long["rss_first"]
    assert long["decode"] and long["frames_per_s"] == pytest.approx(12 / long["seconds"])
    table = format_table(results)
    assert "lssvwm: latency 32/8" in table and "dream/real" in table and "NaN steps: 0" in table
    assert "state 0.34 MiB after reset -> 0.34 MiB at the end (identical)" in table
    assert "preset tiny" in table and "random weights" in table
    check_breakdown(results)


def test_bundled_model_by_default(monkeypatch):
    """Without a preset the bench measures the shipped model (its own variant, real context clips);
    the causal baseline next to it is the bundle's config as that variant, with random weights."""
    from worldsim.bundled import PACKAGE_BUNDLE_DIR, is_bundle, load_bundled

    monkeypatch.delenv("WORLDSIM_BUNDLE_DIR", raising=False)
    if not is_bundle(PACKAGE_BUNDLE_DIR):
        pytest.skip(f"no bundled model in this checkout ({PACKAGE_BUNDLE_DIR})")
    bundle = load_bundled()
    assert RolloutBenchConfig().preset == "bundled"
    cfg = {**TINY, "horizons": (4, 8), "batches": (1, 3), "long_steps": 4}
    del cfg["preset"]
    results = run(RolloutBenchConfig(**cfg))
    assert results["model"] == {"variant": bundle.model.cfg.variant, "parameters": bundle.model.num_parameters()}
    rows = {(r["variant"], r["horizon"]): r for r in results["horizons"]}
    assert rows["lssvwm", 4]["state_bytes"] == rows["lssvwm", 8]["state_bytes"]
    assert results["state_constant"] == {"lssvwm": True, "causal_full": False}  # its KV cache grows
    assert results["long"]["nan_steps"] == 0
    check_breakdown(results)
    assert "the bundled model (lssvwm, 2.3M parameters) and its codec" in format_table(results)


def test_filled_kv_cache_matches_a_streamed_one():
    """The cheap advance of causal_full leaves a cache of exactly the streamed shape."""
    model, codec = random_parts("tiny", "causal_full", "small", torch.device("cpu"))
    rng = np.random.default_rng(0)
    caches = []
    for mode in ("auto", "stream"):
        s = RolloutSession(model, codec, batch=1, sampler_steps=1, seed=0)
        s.reset(rng.integers(0, 256, (1, 1, 64, 64, 3), dtype=np.uint8), np.zeros((1, 0), np.int64))
        assert advance(s, 5, mode, rng) == ("fill" if mode == "auto" else "stream")
        s.step(np.array([1]))  # a real step runs on the filled cache
        caches.append(s)
    filled, streamed = caches
    assert filled.frames_seen == streamed.frames_seen == 7
    assert filled.state_nbytes() == streamed.state_nbytes()
    assert [l.kv.keys.shape for l in filled.cache.layers] == [l.kv.keys.shape for l in streamed.cache.layers]


def test_cli_json_without_real_env():
    out = CliRunner().invoke(bench_app, ["rollout", "--preset", "tiny", "--horizons", "4,8", "--timed-frames", "1",
                                         "--sampler-steps", "1", "--batches", "1", "--dream-steps", "1",
                                         "--breakdown-steps", "1", "--no-real-env", "--long-steps", "2",
                                         "--rss-every", "1", "--no-long-decode", "--variants", "lssvwm",
                                         "--threads", "1", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["real"] is None and data["dream_vs_real"] == {"1": None} and data["dream_vs_real_cpu"] == {"1": None}
    assert data["dream"][0]["rounds"][0]["real"] is None and data["dream_vs_real_cpu_range"] == {"1": None}
    assert data["config"]["preset"] == "tiny" and data["breakdown"][0]["vs_real"] is None
    assert [r["horizon"] for r in data["horizons"]] == [4, 8] and data["long"]["steps"] == 2
    assert data["long"]["decode"] is False and data["long"]["nan_steps"] == 0


def test_cli_without_a_bundle_says_so_in_one_line():
    from worldsim.cli import app

    out = CliRunner().invoke(app, ["bench", "rollout", "--no-real-env", "--threads", "1"])
    assert out.exit_code == 1 and "error: no bundled model at" in out.output


@pytest.mark.parametrize("bad", [dict(rounds=0), dict(real_round_steps=0), dict(model_dtype="float16")])
def test_bad_settings_are_refused_before_any_work(bad):
    with pytest.raises(ValueError, match="rounds|model_dtype"):
        run(RolloutBenchConfig(**{**TINY, **bad}))
