"""The run-folder protocol every checkpoint format shares: names, latest pointer, pruning, one error."""

from __future__ import annotations

import json

import pytest

from worldsim.utils import checkpoint_folders as folders


def write_checkpoint(run, step: int, marker: str = "done.json") -> None:
    tmp = folders.temp_folder(run, step)
    (tmp / marker).write_text("{}")
    folders.commit_checkpoint(run, tmp, step, keep=2, marker=marker)


def test_commit_points_latest_at_the_new_folder_and_prunes(tmp_path):
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step)
    assert [p.name for p in folders.list_checkpoints(tmp_path, "done.json")] == ["step_000002", "step_000003"]
    assert json.loads((tmp_path / "latest.json").read_text()) == {"step": 3, "checkpoint": "checkpoints/step_000003"}
    assert folders.read_latest_pointer(tmp_path) == tmp_path / "checkpoints" / "step_000003"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp left


def test_legacy_dash_names_are_listed_in_step_order_and_pruned(tmp_path):
    # A codec run written before the names were unified: step-<8 digits>.
    for step in (5, 10):
        legacy = tmp_path / "checkpoints" / f"step-{step:08d}"
        legacy.mkdir(parents=True)
        (legacy / "done.json").write_text("{}")
    (tmp_path / "latest.json").write_text(json.dumps({"step": 10, "checkpoint": "checkpoints/step-00000010"}))
    assert folders.read_latest_pointer(tmp_path).name == "step-00000010"
    write_checkpoint(tmp_path, 15)
    assert [p.name for p in folders.list_checkpoints(tmp_path, "done.json")] == ["step-00000010", "step_000015"]


def test_a_corrupt_pointer_is_one_clear_error(tmp_path):
    (tmp_path / "latest.json").write_text('{"step": 3}')
    with pytest.raises(folders.CheckpointError, match="latest.json: corrupt pointer"):
        folders.read_latest_pointer(tmp_path)


def test_every_format_raises_the_same_error_type():
    from worldsim.agents import agent_checkpoint
    from worldsim.codec import checkpoint as codec_checkpoint
    from worldsim.train import checkpoint as model_checkpoint

    assert codec_checkpoint.CheckpointError is model_checkpoint.CheckpointError is folders.CheckpointError
    assert agent_checkpoint.CheckpointError is folders.CheckpointError


def test_a_checkpoint_resolves_from_itself_or_from_its_runs_latest(tmp_path):
    run = tmp_path / "run"
    write_checkpoint(run, 3)
    newest = run / "checkpoints" / folders.checkpoint_name(3)

    def resolve(path, **kwargs):
        return folders.resolve_checkpoint_folder(path, marker="done.json", what="a test checkpoint", **kwargs)

    assert resolve(newest) == newest and resolve(run) == newest
    (newest / "done.json").unlink()  # latest.json now names a folder without the format's file
    with pytest.raises(folders.CheckpointError, match="points at .* which holds no done.json"):
        resolve(run)
    with pytest.raises(folders.CheckpointError, match=r"neither a test checkpoint \(no done.json\) nor a run .*; make one"):
        resolve(tmp_path, hint="; make one")
