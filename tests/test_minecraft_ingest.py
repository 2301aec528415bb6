"""Minecraft readers and `worldsim ingest`, on tiny files written in each published format.

Videos are real mp4 (H.264 through imageio-ffmpeg); frames are compared with PSNR against the
source frames resized the same way, since mp4 is lossy. Consecutive test frames differ strongly,
so an off-by-one alignment between frames and actions drops the PSNR far below the threshold.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import imageio_ffmpeg
import minari
import numpy as np
import pytest
from PIL import Image

from worldsim.data.ingest import SOURCE_FORMATS, ingest
from worldsim.data.minari_writer import dataset_dir
from worldsim.data.minecraft import actions as enc
from worldsim.data.minecraft.video import RecordingError, read_video

SIZE = 32
MIN_PSNR = 30.0


# --------------------------------------------------------------------------- file writers
def make_frames(num: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus a moving block, with colours that jump between frames."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((num, height, width, 3), np.uint8)
    for t in range(num):
        base = rng.integers(0, 256, 3)
        frames[t, ..., 0] = (xx * 200 // width + base[0]) % 256
        frames[t, ..., 1] = (yy * 200 // height + base[1]) % 256
        frames[t, ..., 2] = base[2]
        x0 = int(rng.integers(0, width // 2))
        frames[t, height // 4: 3 * height // 4, x0: x0 + width // 3] = rng.integers(0, 256, 3)
    return frames


def write_mp4(path: Path, frames: np.ndarray, fps: int = 20) -> None:
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(path), (width, height), fps=fps, quality=8, macro_block_size=8, codec="libx264"
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame).tobytes())
    writer.close()


def box_resize(frames: np.ndarray, size: int = SIZE) -> np.ndarray:
    return np.stack(
        [np.asarray(Image.fromarray(f).resize((size, size), Image.Resampling.BOX)) for f in frames]
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def assert_frames_match(got: np.ndarray, source: np.ndarray) -> None:
    want = box_resize(source)
    assert got.shape == want.shape
    worst = min(psnr(g, w) for g, w in zip(got, want))
    assert worst > MIN_PSNR, f"frame PSNR {worst:.1f} dB"


def write_minerl_episode(
    folder: Path, num_steps: int = 20, leading: int = 3, macros: bool = False, seed: int = 0,
    rewards: np.ndarray | None = None, observations: dict[str, np.ndarray] | None = None,
    success: bool = False,
) -> dict:
    """A MineRL v0.4 demonstration: more video frames than states, aligned by the end.

    rewards / observations replace the default random rewards / `observation$inventory$log`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    frames = make_frames(num_steps + 1 + leading, 64, 64, seed)
    write_mp4(folder / "recording.mp4", frames)
    arrays: dict[str, np.ndarray] = {
        f"action${k}": rng.integers(0, 2, num_steps)
        for k in ("attack", "back", "forward", "jump", "left", "right", "sneak", "sprint")
    }
    arrays["action$camera"] = rng.uniform(-30, 30, (num_steps, 2)).astype(np.float32)
    arrays["action$camera"][0] = [200.0, -500.0]  # beyond MineRL's bounds: clipped
    arrays["reward"] = (
        rng.integers(0, 2, num_steps).astype(np.float32) if rewards is None else rewards
    )
    if observations is None:
        observations = {"observation$inventory$log": np.cumsum(rng.integers(0, 2, num_steps + 1))}
    arrays.update(observations)
    if macros:
        items = np.array(["none", "dirt", "none", "stone"])
        arrays["action$place"] = items[rng.integers(0, 4, num_steps)]
        arrays["action$craft"] = np.array(["none", "planks"])[rng.integers(0, 2, num_steps)]
        arrays["action$equip"] = np.array(["none"] * num_steps)
        arrays["action$nearbyCraft"] = np.array(["none"] * num_steps)
        arrays["action$nearbySmelt"] = np.array(["none"] * num_steps)
    np.savez_compressed(folder / "rendered.npz", **arrays)
    meta = {
        "success": success, "duration_ms": num_steps * 50, "duration_steps": num_steps,
        "total_reward": float(arrays["reward"].sum()), "stream_name": folder.name,
        "true_video_frame_count": len(frames),
    }  # fmt: skip
    (folder / "metadata.json").write_text(json.dumps(meta))
    return {"frames": frames[leading:], "arrays": arrays}


def vpt_tick(keys=(), buttons=(), new_buttons=(), dx=0.0, dy=0.0, hotbar=0, gui=False) -> dict:
    return {
        "mouse": {"x": 640.0, "y": 360.0, "dx": dx, "dy": dy, "scaledX": 0.0, "scaledY": 0.0,
                  "dwheel": 0.0, "buttons": list(buttons), "newButtons": list(new_buttons)},
        "keyboard": {"keys": list(keys), "newKeys": [], "chars": ""},
        "isGuiOpen": gui, "isGuiInventory": gui, "hotbar": hotbar,
        "yaw": 0.0, "pitch": 0.0, "xpos": 0.0, "ypos": 64.0, "zpos": 0.0,
        "tick": 0, "milli": 0, "inventory": [], "serverTick": 0, "serverTickDurationMs": 50.0,
        "stats": {},
    }  # fmt: skip


def vpt_ticks(num: int) -> list[dict]:
    """Ticks exercising every mapping rule; the expected encoding is `expected_vpt_actions`."""
    ticks = []
    for t in range(num):
        keys = ["key.keyboard.w"] if t % 2 else ["key.keyboard.space", "key.keyboard.left.shift"]
        if t == 3:
            keys.append("key.keyboard.t")  # chat: unbound, ignored
        if t == 4:
            keys.append("key.keyboard.3")
        buttons = [0] if t < 5 else ([1] if t % 3 else [])  # 0 "held" from the start: stuck
        new_buttons = [0] if t in (0, 7) else []
        if t == 7:
            buttons = [0, 2]  # first real attack press ends the stuck state
        hotbar = 2 if t >= 4 else 0
        hotbar = 5 if t >= 9 else hotbar  # scroll wheel change: no key pressed
        ticks.append(vpt_tick(keys, buttons, new_buttons, dx=t - 3.0, dy=2.0 * t, hotbar=hotbar,
                              gui=t == 6))
    ticks[10]["mouse"]["dx"] = 5000.0  # 750 degrees: clipped to 180
    return ticks


def expected_vpt_actions(num: int) -> np.ndarray:
    want = enc.noop_actions(num)
    idx = enc.button_index
    for t in range(num):
        if t % 2:
            want[t, idx("forward")] = 1
        else:
            want[t, [idx("jump"), idx("sneak")]] = 1
        if t == 4:
            want[t, idx("hotbar.3")] = 1  # key 3 and the hotbar change agree
        if 5 <= t and t % 3 and t != 7:
            want[t, idx("use")] = 1
        if t == 7:
            want[t, [idx("attack"), idx("pickItem")]] = 1
        if t == 9:
            want[t, idx("hotbar.6")] = 1
        want[t, enc.PITCH] = min(2.0 * t * 0.15, 180.0)
        want[t, enc.YAW] = (t - 3.0) * 0.15
    want[10, enc.YAW] = 180.0
    return want


def write_vpt_episode(folder: Path, name: str, num_frames: int = 24, seed: int = 0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    frames = make_frames(num_frames, 360, 640, seed)
    write_mp4(folder / f"{name}.mp4", frames)
    ticks = vpt_ticks(num_frames)
    (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(t) for t in ticks) + "\n")
    return {"frames": frames, "ticks": ticks}


def write_teco_episode(folder: Path, name: str, num_frames: int = 30, seed: int = 0,
                       video_in_npz: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    frames = make_frames(num_frames, 128, 128, seed)
    ids = np.concatenate([[0], rng.integers(1, 4, num_frames - 1)]).astype(np.int32)
    if video_in_npz:
        np.savez_compressed(folder / f"{name}.npz", video=frames, actions=ids)
    else:
        write_mp4(folder / f"{name}.mp4", frames)
        np.savez_compressed(folder / f"{name}.npz", actions=ids)
    return {"frames": frames, "ids": ids}


def load(dataset_id: str) -> minari.MinariDataset:
    return minari.load_dataset(dataset_id)


@pytest.fixture(autouse=True)
def _isolated_minari_root(tmp_path, monkeypatch):
    # Tests pass root=tmp_path / "ds" explicitly; Minari's loader finds it through this variable.
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "ds"))


# ------------------------------------------------------------------------------- encoding
def test_action_encoding_layout_and_minerl_round_trip():
    space = enc.action_space()
    assert space.shape == (25,) and space.dtype == np.float32
    assert len(set(enc.ACTION_NAMES)) == enc.ACTION_DIM == 25
    assert (enc.ACTION_NAMES[enc.PITCH], enc.ACTION_NAMES[enc.YAW]) == enc.CAMERA_NAMES
    assert space.low[enc.PITCH] == -180 and space.high[enc.YAW] == 180
    assert enc.ACTION_NAMES[:9] == (
        "forward", "back", "left", "right", "jump", "sneak", "sprint", "attack", "use"
    )

    minerl_noop = {b: 0 for b in ("forward", "jump", "attack", "sneak")}
    minerl_noop.update(camera=np.zeros(2, np.float32), place="none")
    vector = enc.noop_actions(1)[0]
    vector[[enc.button_index("forward"), enc.button_index("attack"), enc.button_index("use")]] = 1
    vector[[enc.PITCH, enc.YAW]] = [-12.5, 40.0]
    sent = enc.to_minerl_action(vector, minerl_noop)
    assert sent["forward"] == 1 and sent["attack"] == 1 and sent["jump"] == 0
    assert "use" not in sent and sent["place"] == "none"  # the env lacks `use`: no effect there
    np.testing.assert_allclose(sent["camera"], [-12.5, 40.0])
    back = enc.encode_minerl_action(sent)
    want = vector.copy()
    want[enc.button_index("use")] = 0
    np.testing.assert_array_equal(back, want)

    with pytest.raises(ValueError, match="shape"):
        enc.to_minerl_action(np.zeros(24), minerl_noop)
    with pytest.raises(ValueError, match="unknown action 'fly'"):
        enc.encode_minerl_action({"fly": np.array(1)})
    with pytest.raises(KeyError, match="unknown button"):
        enc.button_index("crouch")


# --------------------------------------------------------------------------- MineRL v0.4
def test_minerl_v04_episodes_ingest_with_aligned_frames_actions_rewards(tmp_path):
    src = tmp_path / "minerl"
    ep_a = write_minerl_episode(src / "MineRLTreechop-v0" / "v3_a_1-2", num_steps=20, seed=1)
    ep_b = write_minerl_episode(
        src / "MineRLObtainDiamond-v0" / "v3_b_3-4", num_steps=25, leading=5, macros=True, seed=2
    )
    summary = ingest("minerl-v0.4", src, "worldsim/minerl-test-v0", root=tmp_path / "ds",
                     size=SIZE, progress=False)
    assert (summary.found, summary.added, summary.total_steps) == (2, 2, 45)

    ds = load("worldsim/minerl-test-v0")
    assert ds.total_episodes == 2
    assert ds.storage.metadata["action_encoding"] == enc.ENCODING_NAME
    episodes = list(ds.iterate_episodes())
    metas = list(ds.storage.get_episode_metadata([0, 1]))
    # Sorted discovery: MineRLObtainDiamond-v0 comes before MineRLTreechop-v0.
    for episode, meta, src_ep, leading in zip(episodes, metas, (ep_b, ep_a), (5, 3)):
        arrays = src_ep["arrays"]
        n = len(arrays["reward"])
        assert_frames_match(episode.observations, src_ep["frames"])
        np.testing.assert_array_equal(episode.rewards, arrays["reward"])
        assert episode.truncations[-1] and not episode.terminations.any()
        want = enc.noop_actions(n)
        for key in ("attack", "back", "forward", "jump", "left", "right", "sneak", "sprint"):
            want[:, enc.button_index(key)] = arrays[f"action${key}"]
        want[:, enc.PITCH] = np.clip(arrays["action$camera"][:, 0], -180, 180)
        want[:, enc.YAW] = np.clip(arrays["action$camera"][:, 1], -180, 180)
        if "action$place" in arrays:
            want[:, enc.button_index("use")] = arrays["action$place"] != "none"
        np.testing.assert_array_equal(episode.actions, want)
        assert meta["leading_frames_skipped"] == leading
        assert meta["original_resolution"] == [64, 64]
        assert meta["source_format"] == "minerl-v0.4"
        assert list(episode.infos) == ["observation$inventory$log"]
        np.testing.assert_array_equal(
            episode.infos["observation$inventory$log"], arrays["observation$inventory$log"]
        )
    assert episodes[0].actions[0, enc.PITCH] == 180 and episodes[0].actions[0, enc.YAW] == -180
    crafted = int((ep_b["arrays"]["action$craft"] != "none").sum())
    assert metas[0]["dropped_actions"] == {
        "craft": crafted, "equip": 0, "nearbyCraft": 0, "nearbySmelt": 0
    }
    assert metas[0]["environment"] == "MineRLObtainDiamond-v0"


def navigate_observations(num_steps: int, seed: int) -> dict[str, np.ndarray]:
    """Navigate's non-image observations, one per state: compass angle and dirt held."""
    rng = np.random.default_rng(seed)
    return {
        "observation$compass$angle": rng.uniform(-180, 180, num_steps + 1).astype(np.float32),
        "observation$inventory$dirt": np.cumsum(rng.integers(0, 2, num_steps + 1)),
    }


def test_minerl_observations_go_to_infos_and_reaching_the_goal_terminates(tmp_path):
    src = tmp_path / "minerl"
    n = 10
    last = np.zeros(n, np.float32)
    last[-1] = 100.0  # Navigate: touching the diamond block pays +100 and ends the env
    dense = np.random.default_rng(7).uniform(-0.3, 0.3, n).astype(np.float32)
    dense[-1] = 100.0 - 0.2  # Dense: the goal tick's own (negative) distance reward on top
    diamond = np.zeros(n, np.float32)
    diamond[[2, 5, -1]] = [1.0, 256.0, 1024.0]  # log, iron pickaxe, then the diamond
    mainhand = np.array(["none", "wooden_pickaxe", "iron_pickaxe"])[np.arange(n + 1) * 3 // (n + 1)]
    cases = {  # folder: (writer kwargs, (terminated, truncated, goal_reached))
        "MineRLNavigate-v0/v4_reached": (
            dict(rewards=last, observations=navigate_observations(n, 1), success=True),
            (True, False, True)),
        "MineRLNavigate-v0/v4_quit": (
            dict(rewards=np.zeros(n, np.float32), observations=navigate_observations(n, 2)),
            (False, True, False)),
        "MineRLNavigateDense-v0/v4_dense": (
            dict(rewards=dense, observations=navigate_observations(n, 3), success=True),
            (True, False, True)),
        "MineRLObtainDiamond-v0/v4_diamond": (
            dict(rewards=diamond, observations={
                "observation$inventory$diamond": (np.arange(n + 1) == n).astype(np.int64),
                "observation$equipped_items$mainhand$type": mainhand,
                "observation$equipped_items$mainhand$damage": np.arange(n + 1) * 2,
            }), (True, False, True)),
        "MineRLTreechop-v0/v4_64logs": (
            dict(num_steps=64, rewards=np.ones(64, np.float32)), (True, False, True)),
        "MineRLTreechop-v0/v4_63logs": (
            dict(num_steps=64, rewards=(np.arange(64) > 0).astype(np.float32)),
            (False, True, False)),
        "MineRLBasaltFindCave-v0/v4_basalt": (  # no goal reward: the player ends it with ESC
            dict(rewards=np.zeros(n, np.float32)), (False, True, None)),
    }  # fmt: skip
    written = {}
    for seed, (folder, (writer_kwargs, _)) in enumerate(cases.items()):
        writer_kwargs = {"num_steps": n, **writer_kwargs}
        written[folder] = write_minerl_episode(src / folder, **writer_kwargs, seed=seed)
    (src / "VERSION").write_text("4\n")
    kwargs = dict(root=tmp_path / "ds", size=SIZE, progress=False)
    # Minari reads a dataset as one arrow table: episodes with other infos keys are refused.
    error = (r"v4_quit: its step infos differ from those already in worldsim/minerl-all-v0 "
             r"\(first difference: 'observation\$compass\$angle'\)")
    with pytest.raises(ValueError, match=error):
        ingest("minerl-v0.4", src, "worldsim/minerl-all-v0", **kwargs)
    assert load("worldsim/minerl-all-v0").total_episodes == 1  # intact: the BASALT episode

    by_stream = {}
    for environment in sorted({folder.split("/")[0] for folder in cases}):
        dataset_id = f"worldsim/{environment.lower()}"
        ingest("minerl-v0.4", src / environment, dataset_id, **kwargs)
        ds = load(dataset_id)
        metas = ds.storage.get_episode_metadata(range(ds.total_episodes))
        by_stream.update({m["stream_name"]: (e, m) for e, m in zip(ds.iterate_episodes(), metas)})
    assert len(by_stream) == len(cases)
    for folder, (_, (terminated, truncated, goal)) in cases.items():
        episode, meta = by_stream[folder.split("/")[1]]
        arrays = written[folder]["arrays"]
        assert (episode.terminations[-1], episode.truncations[-1]) == (terminated, truncated)
        assert not episode.terminations[:-1].any() and not episode.truncations[:-1].any()
        assert meta["goal_reached"] == goal and meta["data_version"] == 4
        assert meta["environment"] == folder.split("/")[0]
        observation_keys = sorted(k for k in arrays if k.startswith("observation$"))
        assert sorted(episode.infos) == observation_keys
        for key in observation_keys:  # entry t describes state t, i.e. frame t
            assert len(episode.infos[key]) == len(episode.observations)
            np.testing.assert_array_equal(episode.infos[key], arrays[key])
    assert by_stream["v4_reached"][1]["success"] is True  # the published flag is kept
    assert by_stream["v4_diamond"][0].infos["observation$equipped_items$mainhand$type"][-1] == (
        "iron_pickaxe"
    )


def test_minerl_data_version_is_checked_like_minerls_loader(tmp_path):
    import typer
    from typer.testing import CliRunner

    from worldsim.commands.ingest import ingest as ingest_command

    kwargs = dict(root=tmp_path / "ds", size=SIZE, progress=False)
    good = tmp_path / "good"
    write_minerl_episode(good / "MineRLNavigate-v0" / "v3_a", num_steps=6, seed=1)
    (good / "VERSION").write_text("3")
    assert ingest("minerl-v0.4", good, "worldsim/version-v0", **kwargs).added == 1

    bad = tmp_path / "bad"
    stream = bad / "MineRLNavigate-v0" / "v4_b"
    write_minerl_episode(stream, num_steps=6, seed=2)

    def refused(error: str) -> None:
        with pytest.raises(RecordingError, match=error):
            ingest("minerl-v0.4", bad, "worldsim/version-v0", **kwargs)
        ds = load("worldsim/version-v0")  # the dataset is intact
        assert (ds.total_episodes, ds.total_steps) == (1, 6)

    (bad / "VERSION").write_text("9\n")
    refused(r"bad/VERSION: MineRL data version 9 is not supported .*version 3 or 4 only")
    app = typer.Typer()
    app.command()(ingest_command)
    result = CliRunner().invoke(app, [
        "--source", "minerl-v0.4", "--input-dir", str(bad), "--dataset-id", "worldsim/version-v0",
        "--root", str(tmp_path / "ds"), "--size", str(SIZE), "--no-progress",
    ])  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: {bad / 'VERSION'}: MineRL data version 9 is not supported (MineRL v0.4's loader "
        "reads version 3 or 4 only)"
    ]
    (bad / "VERSION").write_text("four")
    refused(r"bad/VERSION: expected a MineRL data version number, got 'four'")
    # Without a VERSION file the stream folder's v<N>_ prefix decides, as in MineRL's loader.
    (bad / "VERSION").unlink()
    stream = stream.rename(stream.with_name("v5_b"))
    refused(r"v5_b: MineRL data version 5 is not supported")
    stream = stream.rename(stream.with_name("stream_b"))
    refused(r"stream_b: cannot tell the MineRL data version")
    stream.rename(stream.with_name("v4_b"))
    summary = ingest("minerl-v0.4", bad, "worldsim/version-v0", **kwargs)
    assert (summary.added, summary.total_episodes) == (1, 2)
    meta = next(iter(load("worldsim/version-v0").storage.get_episode_metadata([1])))
    assert meta["data_version"] == 4


def test_minerl_empty_episode_folder_is_reported(tmp_path):
    src = tmp_path / "minerl"
    write_minerl_episode(src / "MineRLTreechop-v0" / "v3_a_good", num_steps=6)
    (src / "MineRLTreechop-v0" / "v3_b_empty").mkdir()
    (src / "MineRLTreechop-v0" / ".cache").mkdir()  # hidden folders are not episodes
    kwargs = dict(root=tmp_path / "ds", size=SIZE, progress=False)
    with pytest.raises(RecordingError, match=r"v3_b_empty: episode folder is empty"):
        ingest("minerl-v0.4", src, "worldsim/empty-v0", **kwargs)
    assert load("worldsim/empty-v0").total_episodes == 1  # the good one, committed before

    summary = ingest("minerl-v0.4", src, "worldsim/empty-v0", skip_bad=True, **kwargs)
    assert (summary.found, summary.added, summary.already_present) == (2, 0, 1)
    assert [Path(source).name for source, _ in summary.bad] == ["v3_b_empty"]
    (src / "MineRLTreechop-v0" / "v3_b_empty" / "notes.txt").write_text("not an episode")
    with pytest.raises(RecordingError, match=r"v3_b_empty: episode folder holds none of"):
        ingest("minerl-v0.4", src, "worldsim/empty-v0", **kwargs)


# ------------------------------------------------------------------------------------ VPT
def test_vpt_recording_ingests_with_quirks_corrected(tmp_path):
    src = tmp_path / "vpt"
    rec = write_vpt_episode(src, "cheeky-cornflower-setter-0a1b2c3d-20220101-120000", 24)
    summary = ingest("vpt", src, "worldsim/vpt-test-v0", root=tmp_path / "ds", size=SIZE,
                     progress=False)
    assert summary.added == 1

    ds = load("worldsim/vpt-test-v0")
    episode = next(ds.iterate_episodes())
    meta = next(iter(ds.storage.get_episode_metadata([0])))
    assert episode.observations.dtype == np.uint8
    assert_frames_match(episode.observations, rec["frames"])
    assert episode.actions.shape == (23, 25)  # 24 frames: the last tick leads nowhere
    np.testing.assert_allclose(episode.actions, expected_vpt_actions(24)[:23], atol=1e-6)
    assert not episode.rewards.any()
    assert meta["original_resolution"] == [640, 360]
    assert meta["ignored_keys"] == {"key.keyboard.t": 1}
    assert meta["gui_open_frames"] == 1 and meta["cursor_drawn"] is True


def draw_arrow_full_resolution(frame: np.ndarray, x: float, y: float) -> None:
    """Paste the cursor as VPT's loader pastes its image: top-left corner at (x, y) * H / 720 on
    the full-resolution frame, clipped at the right and bottom edges."""
    from worldsim.data.minecraft.cursor import ARROW

    height, width = frame.shape[:2]
    left, top = int(x * height / 720), int(y * height / 720)
    for r, row in enumerate(ARROW):
        for c, pixel in enumerate(row):
            if pixel != "." and top + r < height and left + c < width:
                frame[top + r, left + c] = 255 if pixel == "O" else 0


def test_vpt_gui_cursor_is_drawn_where_vpts_loader_draws_it(tmp_path):
    from worldsim.data.minecraft import vpt

    # Flat grey frames, so that the cursor is all that differs; 640x360 -> 40x40 is an exact
    # 16x9 area average, computed below by a reshape-mean of the full-resolution drawing.
    size, grey, num = 40, 90, 6
    frames = np.full((num, 360, 640, 3), grey, np.uint8)
    write_mp4(tmp_path / "gui.mp4", frames)
    gui = {1: (640.0, 360.0), 2: (1279.0, 719.0), 3: (101.7, 50.2), 5: (1500.0, 30.0)}
    ticks = [vpt_tick(gui=t in gui) for t in range(num)]
    for t, (x, y) in gui.items():
        ticks[t]["mouse"].update(x=x, y=y)
    (tmp_path / "gui.jsonl").write_text("\n".join(json.dumps(t) for t in ticks))

    plain = vpt.read_episode(tmp_path / "gui.mp4", size, draw_cursor=False)
    drawn = vpt.read_episode(tmp_path / "gui.mp4", size)
    assert np.abs(plain.observations.astype(int) - grey).max() <= 2  # lossy, but flat
    assert (plain.metadata["cursor_drawn"], drawn.metadata["cursor_drawn"]) == (False, True)
    assert drawn.metadata["gui_open_frames"] == len(gui)

    for t in range(num):
        canvas = np.full((360, 640, 3), grey, np.float64)
        if t in gui:
            draw_arrow_full_resolution(canvas, *gui[t])
        want = canvas.reshape(size, 9, size, 16, 3).mean(axis=(1, 3))  # (40, 40, 3)
        got = drawn.observations[t].astype(np.float64)
        assert np.abs(got - want).max() <= 3, f"frame {t}"
        if t not in gui:  # no GUI: the frame is left as decoded
            np.testing.assert_array_equal(drawn.observations[t], plain.observations[t])
    # (640, 360) * 360 / 720 = source pixel (320, 180): output cell (row 20, column 20).
    changed = np.argwhere(np.abs(drawn.observations[1].astype(int) - plain.observations[1]).max(-1))
    assert changed.min(0).tolist() == [20, 20]
    # 28 white and 17 black arrow pixels in that 16x9 cell: 90 + (28 * 165 - 17 * 90) / 144 = 111.
    assert abs(int(drawn.observations[1, 20, 20, 0]) - 111) <= 2
    np.testing.assert_array_equal(drawn.observations[5], plain.observations[5])  # off the frame

    ticks[3]["mouse"]["x"] = None
    (tmp_path / "gui.jsonl").write_text("\n".join(json.dumps(t) for t in ticks))
    with pytest.raises(RecordingError, match=r"gui\.jsonl:4: mouse 'x' must be a finite number"):
        vpt.read_episode(tmp_path / "gui.mp4", size)


def test_vpt_stuck_attack_is_removed_as_vpts_loader_does():
    from worldsim.data.minecraft.vpt import encode_ticks

    attack, use = enc.button_index("attack"), enc.button_index("use")

    def encoded(buttons: list[list[int]], new_buttons: list[list[int]]) -> np.ndarray:
        ticks = [vpt_tick(buttons=b, new_buttons=n) for b, n in zip(buttons, new_buttons)]
        return encode_ticks(ticks, Path("rec.jsonl"))[0]

    # Tick 0 reports exactly a new press of attack: stuck, never really pressed -> no attack.
    got = encoded([[0], [0], [0, 1], [0]], [[0], [], [1], []])
    assert got[:, attack].tolist() == [0, 0, 0, 0] and got[:, use].tolist() == [0, 0, 1, 0]
    # ... until newButtons holds 0 again: a real press, kept from that tick on.
    got = encoded([[0], [0], [], [0], [0]], [[0], [], [], [0], []])
    assert got[:, attack].tolist() == [0, 0, 0, 1, 1]
    # Anything else on tick 0 is not the quirk: attack is kept as recorded.
    assert encoded([[0, 1], [0]], [[0, 1], []])[:, attack].tolist() == [1, 1]
    assert encoded([[0], [0]], [[], []])[:, attack].tolist() == [1, 1]
    assert encoded([[], [0], [0]], [[], [0], []])[:, attack].tolist() == [0, 1, 1]

    bad = [vpt_tick(buttons=[0], new_buttons=[0])]
    bad[0]["mouse"]["newButtons"] = 0
    with pytest.raises(RecordingError, match=r"rec\.jsonl:1: mouse 'newButtons' must be a list"):
        encode_ticks(bad, Path("rec.jsonl"))


# ----------------------------------------------------------------------------------- TECO
def test_teco_release_ingests_mp4_and_npz_video(tmp_path):
    src = tmp_path / "teco" / "train"
    from_mp4 = write_teco_episode(src / "0", "000000", 30, seed=3)
    from_npz = write_teco_episode(src / "1", "000000", 20, seed=4, video_in_npz=True)
    summary = ingest("teco", tmp_path / "teco", "worldsim/teco-test-v0", root=tmp_path / "ds",
                     size=SIZE, progress=False)
    assert (summary.added, summary.total_steps) == (2, 29 + 19)

    ds = load("worldsim/teco-test-v0")
    table = {
        1: {"forward": 1, "jump": 1, "yaw": 0.0},
        2: {"forward": 0, "jump": 1, "yaw": -20.0},
        3: {"forward": 0, "jump": 1, "yaw": 20.0},
    }
    for episode, src_ep in zip(ds.iterate_episodes(), (from_mp4, from_npz)):
        assert_frames_match(episode.observations, src_ep["frames"])
        for action, teco_id in zip(episode.actions, src_ep["ids"][1:]):
            row = table[int(teco_id)]
            assert action[enc.button_index("forward")] == row["forward"]
            assert action[enc.button_index("jump")] == row["jump"]
            assert action[enc.YAW] == row["yaw"] and action[enc.PITCH] == 0
            assert action.sum() == row["forward"] + row["jump"] + row["yaw"]
    metas = list(ds.storage.get_episode_metadata([0, 1]))
    assert metas[0]["original_resolution"] == [128, 128] and metas[0]["fps"] == 20.0
    assert metas[1]["frames_file"].endswith("1/000000.npz")


# ---------------------------------------------------------------------------- resuming
def test_rerun_skips_committed_sources_and_adds_new_ones(tmp_path):
    src = tmp_path / "teco"
    for i in range(2):
        write_teco_episode(src, f"{i:06d}", 12, seed=i)
    args = ("teco", src, "worldsim/resume-v0")
    kwargs = dict(root=tmp_path / "ds", size=SIZE, progress=False)
    assert ingest(*args, **kwargs).added == 2
    again = ingest(*args, **kwargs)
    assert (again.added, again.already_present, again.total_episodes) == (0, 2, 2)
    write_teco_episode(src, "000002", 12, seed=2)
    third = ingest(*args, **kwargs)
    assert (third.added, third.already_present, third.total_episodes) == (1, 2, 3)
    with pytest.raises(ValueError, match="different observation space"):
        ingest(*args, root=tmp_path / "ds", size=SIZE * 2, progress=False)


def test_duplicates_are_found_by_content_as_well_as_path(tmp_path):
    src = tmp_path / "teco"
    write_teco_episode(src / "a", "000000", 12, seed=1)
    write_teco_episode(src / "a", "000001", 12, seed=2)
    (src / "b").mkdir()  # the same recording again, under another name and folder
    for suffix in (".mp4", ".npz"):
        shutil.copy(src / "a" / f"000000{suffix}", src / "b" / f"copy{suffix}")
    kwargs = dict(root=tmp_path / "ds", size=SIZE, progress=False)
    first = ingest("teco", src, "worldsim/dup-v0", **kwargs)
    assert (first.added, first.already_present, first.total_episodes) == (2, 1, 2)
    assert first.duplicates == [
        (str(src / "b" / "copy.npz"), str((src / "a" / "000000.npz").resolve()))
    ]

    moved = src.rename(tmp_path / "moved")  # every path changes before the resume
    again = ingest("teco", moved, "worldsim/dup-v0", **kwargs)
    assert (again.added, again.already_present, len(again.duplicates)) == (0, 3, 3)
    assert again.total_episodes == 2

    ids = np.load(moved / "b" / "copy.npz")["actions"]
    ids[5] = ids[5] % 3 + 1  # another action: another recording, although the video is the same
    np.savez_compressed(moved / "b" / "copy.npz", actions=ids)
    third = ingest("teco", moved, "worldsim/dup-v0", **kwargs)
    assert (third.added, third.total_episodes) == (1, 3)
    hashes = [m["source_sha256"] for m in load("worldsim/dup-v0").storage.get_episode_metadata(
        range(3))]
    assert len(set(hashes)) == 3 and all(len(h) == 64 for h in hashes)


def test_content_hash_covers_each_formats_video_and_action_files(tmp_path):
    from worldsim.data.ingest import READERS, content_hash

    write_vpt_episode(tmp_path / "vpt", "rec", 12)
    write_minerl_episode(tmp_path / "minerl" / "MineRLNavigate-v0" / "v3_a", num_steps=4)
    sources = {
        "vpt": (tmp_path / "vpt" / "rec.mp4", "renamed.mp4", ".jsonl"),
        "minerl-v0.4": (tmp_path / "minerl" / "MineRLNavigate-v0" / "v3_a", "v3_copy",
                        "rendered.npz"),
    }  # fmt: skip
    for source_format, (source, copy_name, action_file) in sources.items():
        files = READERS[source_format].source_files
        digest = content_hash(files(source))
        if source.is_dir():
            copy = shutil.copytree(source, source.with_name(copy_name))
            actions_path = Path(copy) / action_file
        else:
            copy = source.with_name(copy_name)
            for path in files(source):
                shutil.copy(path, copy.with_suffix(path.suffix))
            actions_path = copy.with_suffix(action_file)
        assert content_hash(files(Path(copy))) == digest, source_format
        actions_path.write_bytes(actions_path.read_bytes() + b"\n")
        assert content_hash(files(Path(copy))) != digest, source_format
        actions_path.unlink()
        assert content_hash(files(Path(copy))) is None  # reading it reports the missing file


def test_sources_mix_in_one_dataset_but_not_with_other_encodings(tmp_path):
    from worldsim.data.ingest import observation_space
    from worldsim.data.minari_writer import DatasetWriter

    write_teco_episode(tmp_path / "teco", "000000", 12)
    write_vpt_episode(tmp_path / "vpt", "rec", 12)
    kwargs = dict(root=tmp_path / "ds", size=SIZE, progress=False)
    ingest("teco", tmp_path / "teco", "worldsim/mixed-v0", **kwargs)
    summary = ingest("vpt", tmp_path / "vpt", "worldsim/mixed-v0", **kwargs)
    assert summary.total_episodes == 2
    ds = load("worldsim/mixed-v0")
    assert ds.storage.metadata["source_formats"] == ["teco", "vpt"]
    assert [m["source_format"] for m in ds.storage.get_episode_metadata([0, 1])] == ["teco", "vpt"]

    # Same spaces, but written by something that does not declare this encoding: refused.
    DatasetWriter("worldsim/foreign-v0", observation_space(SIZE), enc.action_space(),
                  root=tmp_path / "ds")
    with pytest.raises(ValueError, match="action encoding None"):
        ingest("teco", tmp_path / "teco", "worldsim/foreign-v0", **kwargs)


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from worldsim.data.ingest import ingest
    ingest("teco", sys.argv[1], "worldsim/killed-v0", root=sys.argv[2], size=16, progress=False)
    """
)


def test_killed_ingestion_resumes_without_duplicates(tmp_path):
    src = tmp_path / "teco"
    num = 8
    for i in range(num):
        write_teco_episode(src, f"{i:06d}", 40, seed=i, video_in_npz=True)
    root = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(src), str(root)])
    meta_path = dataset_dir("worldsim/killed-v0", root) / "data" / "metadata.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if meta_path.exists() and json.loads(meta_path.read_text())["total_episodes"] >= 1:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "ingestion finished before it could be killed"

    summary = ingest("teco", src, "worldsim/killed-v0", root=root, size=16, progress=False)
    assert summary.total_episodes == num and summary.added + summary.already_present == num
    ds = load("worldsim/killed-v0")
    sources = [m["source_file"] for m in ds.storage.get_episode_metadata(range(num))]
    assert sorted(sources) == sorted(str(p.resolve()) for p in src.glob("*.npz"))
    assert sum(len(e.actions) for e in ds.iterate_episodes()) == num * 39


# ------------------------------------------------------------------------------ bad input
def test_truncated_mp4_is_reported_with_its_path(tmp_path):
    src = tmp_path / "vpt"
    write_vpt_episode(src, "rec", 12)
    video = src / "rec.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    with pytest.raises(RecordingError, match=r"rec\.mp4"):
        ingest("vpt", src, "worldsim/bad-v0", root=tmp_path / "ds", size=SIZE, progress=False)
    # The dataset is created only when an episode is ready: nothing half-written is left.
    assert not dataset_dir("worldsim/bad-v0", tmp_path / "ds").exists()


def test_frame_action_count_mismatch(tmp_path):
    src = tmp_path / "vpt"
    write_vpt_episode(src, "rec", 12)
    lines = (src / "rec.jsonl").read_text().splitlines()
    (src / "rec.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(RecordingError, match=r"rec\.mp4: has 12 video frames but .*rec\.jsonl"):
        ingest("vpt", src, "worldsim/bad-v0", root=tmp_path / "ds", size=SIZE, progress=False)


def test_corrupt_jsonl_line_names_file_and_line(tmp_path):
    src = tmp_path / "vpt"
    write_vpt_episode(src, "rec", 12)
    lines = (src / "rec.jsonl").read_text().splitlines()
    lines[4] = lines[4][:40]
    (src / "rec.jsonl").write_text("\n".join(lines))
    with pytest.raises(RecordingError, match=r"rec\.jsonl:5: corrupt JSON line"):
        ingest("vpt", src, "worldsim/bad-v0", root=tmp_path / "ds", size=SIZE, progress=False)


def test_minerl_missing_key_unknown_action_and_obfuscated_vector(tmp_path):
    folder = tmp_path / "minerl" / "MineRLTreechop-v0" / "v3_x"
    write_minerl_episode(folder, num_steps=10)
    npz = folder / "rendered.npz"
    arrays = dict(np.load(npz))

    def run():
        ingest("minerl-v0.4", tmp_path / "minerl", "worldsim/bad-v0", root=tmp_path / "ds",
               size=SIZE, progress=False)

    np.savez_compressed(npz, **{k: v for k, v in arrays.items() if k != "reward"})
    with pytest.raises(RecordingError, match=r"rendered\.npz: missing key 'reward'"):
        run()
    np.savez_compressed(npz, **arrays, **{"action$fly": np.zeros(10, int)})
    with pytest.raises(RecordingError, match=r"rendered\.npz: unknown action 'fly'"):
        run()
    np.savez_compressed(npz, **arrays, **{"action$vector": np.zeros((10, 64), np.float32)})
    with pytest.raises(RecordingError, match="obfuscated"):
        run()
    np.savez_compressed(npz, **{**arrays, "observation$inventory$log": np.zeros(10, int)})
    with pytest.raises(RecordingError, match=r"'observation\$inventory\$log' has 10 entries"):
        run()
    np.savez_compressed(npz, **{**arrays, "action$camera": np.zeros((10, 3), np.float32)})
    with pytest.raises(RecordingError, match=r"'camera' must be \(N, 2\)"):
        run()
    np.savez_compressed(npz, **{**arrays, "observation$compass$angle": np.zeros(11, complex)})
    with pytest.raises(RecordingError, match=r"'observation\$compass\$angle' has unsupported dtype"):
        run()
    np.savez_compressed(npz, **arrays)
    npz.write_bytes(npz.read_bytes()[:200])
    with pytest.raises(RecordingError, match=r"rendered\.npz: corrupt or truncated npz"):
        run()
    np.savez_compressed(npz, **arrays)
    (folder / "metadata.json").write_text(json.dumps({"true_video_frame_count": 99}))
    with pytest.raises(RecordingError, match=r"recording\.mp4: has 14 video frames but .*99"):
        run()
    (folder / "metadata.json").write_text(json.dumps({"success": "yes"}))
    with pytest.raises(RecordingError, match=r"metadata\.json: success must be true or false"):
        run()
    (folder / "metadata.json").unlink()
    with pytest.raises(RecordingError, match=r"metadata\.json: missing"):
        run()


def test_teco_unknown_action_and_missing_key(tmp_path):
    src = tmp_path / "teco"
    write_teco_episode(src, "000000", 10)
    np.savez_compressed(src / "000000.npz", actions=np.array([0, 1, 2, 7, 1, 1, 1, 1, 1, 1]))
    with pytest.raises(RecordingError, match=r"000000\.npz: unknown TECO action id 7"):
        ingest("teco", src, "worldsim/bad-v0", root=tmp_path / "ds", size=SIZE, progress=False)
    np.savez_compressed(src / "000000.npz", act=np.zeros(10, int))
    with pytest.raises(RecordingError, match=r"000000\.npz: missing key 'actions'"):
        ingest("teco", src, "worldsim/bad-v0", root=tmp_path / "ds", size=SIZE, progress=False)


def test_skip_bad_reports_and_keeps_going(tmp_path):
    src = tmp_path / "teco"
    for i in range(3):
        write_teco_episode(src, f"{i:06d}", 10, seed=i)
    (src / "000001.mp4").write_bytes(b"not a video at all")
    summary = ingest("teco", src, "worldsim/skip-v0", root=tmp_path / "ds", size=SIZE,
                     skip_bad=True, progress=False)
    assert (summary.added, summary.total_episodes) == (2, 2)
    assert len(summary.bad) == 1 and "000001.mp4" in summary.bad[0][1]


def test_empty_folder_and_unknown_format_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecordingError, match="no vpt episodes found"):
        ingest("vpt", tmp_path / "empty", "worldsim/x-v0", root=tmp_path / "ds", progress=False)
    with pytest.raises(ValueError, match="unknown source format 'minerl'"):
        ingest("minerl", tmp_path / "empty", "worldsim/x-v0", root=tmp_path / "ds")
    write_mp4(tmp_path / "empty" / "lonely.mp4", make_frames(4, 64, 64))
    with pytest.raises(RecordingError, match=r"lonely\.jsonl: missing"):
        ingest("vpt", tmp_path / "empty", "worldsim/x-v0", root=tmp_path / "ds", progress=False)


def test_read_video_counts_and_resizes(tmp_path):
    frames = make_frames(9, 96, 160)  # ratios >= 3: swscale area == true area averaging
    write_mp4(tmp_path / "v.mp4", frames)
    got, info = read_video(tmp_path / "v.mp4", SIZE, expected_frames=9)
    assert got.shape == (9, SIZE, SIZE, 3) and (info.width, info.height) == (160, 96)
    assert_frames_match(got, frames)
    with pytest.raises(RecordingError, match="has 9 video frames but x.npz describes 10"):
        read_video(tmp_path / "v.mp4", SIZE, expected_frames=10, counted_by="x.npz")
    with pytest.raises(RecordingError, match="missing video file"):
        read_video(tmp_path / "nope.mp4", SIZE)
    damaged = bytearray((tmp_path / "v.mp4").read_bytes())
    for offset in range(2000, len(damaged) - 1000, 500):  # inside the H.264 data
        damaged[offset: offset + 16] = bytes(16)
    (tmp_path / "v.mp4").write_bytes(bytes(damaged))
    with pytest.raises(RecordingError, match=r"v\.mp4: (corrupt|ffmpeg could not)"):
        read_video(tmp_path / "v.mp4", SIZE)


# ------------------------------------------------------------------------------------ CLI
def test_cli_ingest_command(tmp_path):
    import typer
    from typer.testing import CliRunner

    from worldsim.commands.ingest import SourceFormat
    from worldsim.commands.ingest import ingest as ingest_command

    assert tuple(f.value for f in SourceFormat) == SOURCE_FORMATS
    app = typer.Typer()
    app.command()(ingest_command)
    src = tmp_path / "teco"
    write_teco_episode(src, "000000", 10)
    args = ["--source", "teco", "--input-dir", str(src), "--dataset-id", "worldsim/cli-v0",
            "--root", str(tmp_path / "ds"), "--size", str(SIZE), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 episodes added" in result.output
    (src / "000000.npz").write_bytes(b"garbage")
    (src / "000001.mp4").write_bytes(b"garbage")
    result = CliRunner().invoke(app, [*args[:5], "worldsim/cli2-v0", *args[6:]])
    assert result.exit_code == 1 and "000000.npz" in result.output

    vpt_src = tmp_path / "vpt"
    write_vpt_episode(vpt_src / "a", "rec", 12)
    shutil.copytree(vpt_src / "a", vpt_src / "b")  # the same recording twice
    vpt_args = ["--source", "vpt", "--input-dir", str(vpt_src), "--dataset-id", "worldsim/cli3-v0",
                "--root", str(tmp_path / "ds"), "--size", str(SIZE), "--no-progress",
                "--no-vpt-cursor"]  # fmt: skip
    result = CliRunner().invoke(app, vpt_args)
    assert result.exit_code == 0, result.output
    assert "1 episodes added, 1 already present (1 of them by content, under another path)" in (
        result.output
    )
    meta = next(iter(load("worldsim/cli3-v0").storage.get_episode_metadata([0])))
    assert meta["cursor_drawn"] is False and meta["gui_open_frames"] == 1


# ------------------------------------------------------------------------------ live env
def test_minerl_adapter_without_minerl_says_why():
    from worldsim.envs import minerl as adapter

    try:
        import minerl  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs the `minerl` package"):
            adapter.MineRLEnv("MineRLTreechop-v0")
    else:
        pytest.skip("minerl is installed; the live test below covers the adapter")


def test_minerl_live_env_through_the_adapter():
    pytest.importorskip(
        "minerl", reason="minerl needs Java 8 and downloads Minecraft at install (offline here)"
    )
    from worldsim.envs.minerl import MineRLEnv

    env = MineRLEnv("MineRLTreechop-v0", size=SIZE)
    try:
        obs, _ = env.reset(seed=0)
        assert obs.shape == (SIZE, SIZE, 3) and obs.dtype == np.uint8
        action = enc.noop_actions(1)[0]
        action[enc.button_index("forward")] = 1
        obs, reward, terminated, truncated, _ = env.step(action)
        assert env.observation_space.contains(obs) and isinstance(reward, float)
    finally:
        env.close()
