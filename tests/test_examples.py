"""The examples in examples/ run end to end with tiny settings on a tiny world model (random init):
MPC in the real maze, and the memory evaluation on a given dataset and on freshly collected episodes."""

import importlib.util
import json
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from worldsim.data.minari_writer import DatasetWriter, Episode
from tiny_world import save_tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    """examples/ is not a package: import a script from its path (its main() does not run)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny world-model run folders (different random weights), each recording its codec."""
    root = tmp_path_factory.mktemp("example-runs")
    return {label: save_tiny_run(root / label, seed=seed) for seed, label in enumerate(("a", "b"))}


def _finite_scores(summary: dict) -> None:
    assert summary["buckets"] and summary["count"] == sum(b["count"] for b in summary["buckets"])
    for block in (summary, *summary["buckets"]):
        assert math.isfinite(block["psnr"]["mean"]) and 0 < block["psnr"]["mean"] < 100
        assert math.isfinite(block["ssim"]["mean"]) and -1 <= block["ssim"]["mean"] <= 1


# ------------------------------------------------------------------------------ plan_in_memory_maze
def test_importing_an_example_runs_nothing(capsys):
    load_example("plan_in_memory_maze")
    load_example("evaluate_memory")
    assert capsys.readouterr().out == ""


def test_plan_example_compares_the_planner_with_random_actions(runs, capsys):
    example = load_example("plan_in_memory_maze")
    result = example.main(["--checkpoint", str(runs["a"]), "--planner", "mppi", "--horizon", "2",
                           "--candidates", "4", "--iterations", "1", "--steps", "3", "--episodes", "1",
                           "--context-frames", "2"])
    assert set(result) == {"planner", "random"}
    for r in result.values():
        assert r["decisions"] == 3 and r["lengths"] == [3] and len(r["returns"]) == 1
        assert np.isfinite(r["returns"]).all()
    assert result["planner"]["ms_per_decision"] > result["random"]["ms_per_decision"] > 0
    out = capsys.readouterr().out
    assert "ms / decision" in out
    assert out.splitlines()[-2].split()[0] == "mppi" and out.splitlines()[-1].split()[0] == "random"


# ------------------------------------------------------------------------------ evaluate_memory
@pytest.fixture(scope="module")
def revisit_dataset(tmp_path_factory) -> Path:
    """One 40-step episode whose metadata records two revisits: gaps 15 and 23 (> the tiny models'
    attention window of 9), in two gap buckets."""
    rng = np.random.default_rng(0)
    writer = DatasetWriter("test/example-mem-v0", gym.spaces.Box(0, 255, (64, 64, 3), np.uint8),
                           gym.spaces.Discrete(6), root=tmp_path_factory.mktemp("example-data"))
    n, no = 40, np.zeros(40, bool)
    frames = rng.integers(0, 256, (n + 1, 64, 64, 3), dtype=np.uint8)
    writer.append(Episode(frames, rng.integers(0, 6, n), np.zeros(n), no, no,
                          metadata={"revisits": [[30, 15], [35, 12]]}))
    return writer.path


def test_memory_example_scores_each_model_on_a_given_dataset(runs, revisit_dataset, tmp_path, capsys):
    example = load_example("evaluate_memory")
    out_dir = tmp_path / "eval"
    results = example.main(["--checkpoint", f"a={runs['a']}", "--checkpoint", f"b={runs['b']}",
                            "--dataset", str(revisit_dataset), "--protocol", "revisits", "--context", "24",
                            "--horizon", "2", "--sampler-steps", "1", "--out-dir", str(out_dir)])
    block = results["protocols"]["revisits"]
    assert list(results["protocols"]) == ["revisits"] and results["qualifying_gap"] == 9
    assert block["pairs"] == [[0, 30, 15], [0, 35, 12]]
    assert set(block["models"]) == {"a", "b"} and set(block["references"]) == {"copy_last", "earlier_visit"}
    for summary in (*block["models"].values(), *block["references"].values()):
        _finite_scores(summary)
        assert [(b["gap_min"], b["gap_max"]) for b in summary["buckets"]] == [(0, 16), (16, 32)]
    assert json.loads((out_dir / "memory.json").read_text())["protocols"]["revisits"]["pairs"] == block["pairs"]
    assert (out_dir / "memory_revisits.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "copy_last (ref)" in out and str(out_dir / "memory.json") in out


@pytest.mark.slow  # ~15 s: a worker process and a MuJoCo env
def test_memory_example_collects_revisit_episodes_when_given_no_dataset(runs, tmp_path, capsys):
    """The default path: a short revisit-policy episode in the real maze, collected into a
    temporary folder, then both protocols on it."""
    example = load_example("evaluate_memory")
    results = example.main(["--checkpoint", str(runs["a"]), "--collect", "1", "--collect-steps", "250",
                            "--context", "120", "--horizon", "2", "--max-targets", "2", "--sampler-steps", "1",
                            "--out-dir", str(tmp_path)])
    assert "collected 1 episode(s) (250 steps" in capsys.readouterr().out
    assert not Path(results["config"]["dataset"]).exists()  # the temporary dataset is gone
    assert list(results["config"]["checkpoints"]) == ["run"]  # a bare path is labelled by its folder
    for protocol in ("revisits", "retrieval"):
        block = results["protocols"][protocol]
        assert 1 <= block["targets"] <= 2
        for _, t_now, t_before in block["pairs"]:
            assert 9 < t_now - t_before <= 120 and 120 <= t_now <= 248
        _finite_scores(block["models"]["run"])
        assert (tmp_path / f"memory_{protocol}.png").is_file()
    assert (tmp_path / "memory.json").is_file()
