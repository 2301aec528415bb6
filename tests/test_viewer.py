"""The keyboard viewer, headless (SDL's dummy video driver, see conftest.py), with scripted key
events, a real tiny world model and codec (random init, fixed seeds) and the real Memory Maze
(in a worker process, as `worldsim play` runs it). The last tests run `worldsim play` itself in
a subprocess: headless with SDL's EGL-based "offscreen" driver, and in a window under Xvfb."""

import os
import select
import shutil
import subprocess
import sys
import time

import imageio.v2 as imageio
import numpy as np
import pygame
import pytest
import torch
from typer.testing import CliRunner

from worldsim.envs.dream import ClipContext, MemoryMazeContext
from worldsim.envs.memory_maze import ACTION_NAMES, MemoryMazeEnv
from worldsim.envs.subprocess_env import SubprocessEnv
from worldsim.utils.labels import LABEL_HEIGHT, label_panels
from worldsim.viewer.app import NO_REAL, OVERLAY_ROWS, Viewer, ViewerConfig, _wrap
from worldsim.viewer.keymap import (
    CONTROLS, DIGIT_KEYS, FORWARD_KEYS, LEFT_KEYS, MEMORY_MAZE_KEYMAP, RIGHT_KEYS, number_keymap,
)
from worldsim.viewer.policies import RandomWalk, load_sb3_policy
from tiny_world import save_tiny_run, tiny_parts

torch.set_num_threads(1)  # tiny models on a shared 2-core box: threads only add overhead
T0 = 5  # context frames
A = {name: i for i, name in enumerate(ACTION_NAMES)}


def down(key):
    return pygame.event.Event(pygame.KEYDOWN, key=key)


def up(key):
    return pygame.event.Event(pygame.KEYUP, key=key)


def tap(key):
    return [down(key), up(key)]


@pytest.fixture(scope="module")
def parts():
    return tiny_parts(0)


@pytest.fixture(scope="module")
def clips():
    rng = np.random.default_rng(0)
    episodes = [rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8) for n in (8, 10)]
    return ClipContext(episodes, [rng.integers(0, 6, len(e) - 1) for e in episodes])


@pytest.fixture(scope="module")
def maze():
    # The viewer's Memory Maze, in a worker process: its OpenGL never meets pygame's window.
    env = SubprocessEnv(MemoryMazeEnv, size=9, render_mode="rgb_array")
    yield env
    env.close()


def make_viewer(parts, context, **config):
    policy = config.pop("policy", None)
    config = {"context_frames": T0, "sampler_steps": 1, "fps": 0, "scale": 2, "show_real": False, **config}
    return Viewer(*parts, context, ViewerConfig(**config), policy=policy)


# ------------------------------------------------------------------ keymap
def test_memory_maze_keymap_covers_all_actions_and_combos():
    km = MEMORY_MAZE_KEYMAP
    assert km(set()) == A["noop"]
    for fwd in FORWARD_KEYS:
        assert km({fwd}) == A["forward"]
        for left in LEFT_KEYS:
            assert km({fwd, left}) == A["forward_left"]
        for right in RIGHT_KEYS:
            assert km({fwd, right}) == A["forward_right"]
    assert km({pygame.K_a}) == A["turn_left"] and km({pygame.K_RIGHT}) == A["turn_right"]
    assert km({pygame.K_LEFT, pygame.K_RIGHT}) == A["noop"]  # opposite turns cancel
    assert km({pygame.K_w, pygame.K_a, pygame.K_d}) == A["forward"]
    assert km({pygame.K_x}) == A["noop"]  # unmapped keys do nothing
    assert {km(s) for s in ({}, {pygame.K_UP}, {pygame.K_LEFT}, {pygame.K_RIGHT},
                            {pygame.K_UP, pygame.K_LEFT}, {pygame.K_UP, pygame.K_RIGHT})} == set(range(6))


def test_number_keymap_and_controls_do_not_collide():
    km = number_keymap(4)
    assert km(set()) == 0 and km({pygame.K_3}) == 3 and km({pygame.K_KP2}) == 2
    assert km({pygame.K_9}) == 0  # out of range: ignored
    assert km({pygame.K_3, pygame.K_1}) == 1
    game_keys = FORWARD_KEYS | LEFT_KEYS | RIGHT_KEYS | set(DIGIT_KEYS)
    assert game_keys.isdisjoint(CONTROLS)
    assert set(CONTROLS.values()) == {"pause", "step", "agent", "reset", "real", "record", "quit"}


# ------------------------------------------------------------------ driving the dream
def test_keys_reach_the_model_and_tab_hands_over_to_the_agent(parts, clips):
    human = make_viewer(parts, clips)
    script = [[down(pygame.K_UP)], [down(pygame.K_LEFT)], [up(pygame.K_UP), up(pygame.K_LEFT)],
              tap(pygame.K_d),  # a tap shorter than a frame still counts
              [], [pygame.event.Event(pygame.KEYDOWN, key=pygame.K_TAB)], []]
    assert human.run(max_frames=len(script), events=script) == len(script)
    expected_human = [A["forward"], A["forward_left"], A["noop"], A["turn_right"], A["noop"]]
    assert human.actions[:5] == expected_human
    assert human.mode == "agent" and human.t == 7

    # The agent receives the dream's current frame; a scripted policy replaying the same actions
    # from the same seed gives the same frames (so the keys' actions are what the model got) ...
    seen = []

    def replay(actions):
        def policy(frame):
            seen.append(frame)
            return actions[len(seen) - 1]
        return policy

    agent = make_viewer(parts, clips, policy=replay(human.actions))
    agent.handle_events([pygame.event.Event(pygame.KEYDOWN, key=pygame.K_TAB)])
    agent.run(max_frames=7)
    assert agent.actions == human.actions
    np.testing.assert_array_equal(agent.frame, human.frame)
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in seen)
    # ... while other actions from the same seed dream something else.
    seen.clear()
    other = make_viewer(parts, clips, policy=replay([A["turn_left"]] * 7))
    other.mode = "agent"
    other.run(max_frames=7)
    assert not np.array_equal(other.frame, human.frame)
    for v in (human, agent, other):
        v.close()


def test_default_agent_is_a_seeded_random_walk():
    a, b = RandomWalk(6, seed=1), RandomWalk(6, seed=1)
    frame = np.zeros((64, 64, 3), np.uint8)
    walk = [a(frame) for _ in range(200)]
    assert walk == [b(frame) for _ in range(200)] and set(walk) == set(range(6))
    repeats = np.mean(np.array(walk[1:]) == np.array(walk[:-1]))
    assert 0.6 < repeats < 0.95  # it keeps going one way for a while


def test_pause_stops_stepping_and_single_step_advances_one_frame(parts, clips):
    v = make_viewer(parts, clips)
    space, period, n = (down(k) for k in (pygame.K_SPACE, pygame.K_PERIOD, pygame.K_n))
    script = [[space], [down(pygame.K_UP)], [], [period], [], [n], [], [space]]
    frames_at = []
    for events in script:
        v.handle_events(events)
        v.update()
        v.draw()
        frames_at.append((v.t, v.frame.copy()))
    assert [t for t, _ in frames_at] == [0, 0, 0, 1, 1, 2, 2, 3]
    np.testing.assert_array_equal(frames_at[0][1], frames_at[2][1])  # paused: the picture holds
    assert not np.array_equal(frames_at[2][1], frames_at[3][1])
    assert v.actions == [A["forward"]] * 3
    v.handle_events([period])  # not paused: `.` does nothing
    v.update()
    assert v.t == 4
    v.close()


def test_quit_keys_and_posted_events_end_the_loop(parts, clips):
    v = make_viewer(parts, clips)
    pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_q))  # through pygame's queue
    assert v.run(max_frames=5) == 0 and not v.running and v.t == 0
    v.running = True
    assert v.run(max_frames=5, events=[[], [], [down(pygame.K_ESCAPE)]]) == 2
    v.close()


def test_overlay_shows_fps_latency_mode_and_the_scaled_frame(parts, clips):
    v = make_viewer(parts, clips, scale=3)
    v.run(max_frames=4)
    top, middle = v.overlay_text()[:2]
    assert v.fps > 0 and v.step_ms > 0
    assert f"{v.fps:.1f} fps" in top and f"step {v.step_ms:.0f} ms" in top
    assert "human" in middle and "t=4" in middle and "reward" in middle
    screen = pygame.surfarray.array3d(v.draw()).transpose(1, 0, 2)  # (x, y) -> (H, W, 3)
    assert screen.shape[1] == 64 * 3 and screen.shape[0] > 64 * 3  # the overlay sits below
    big = np.repeat(np.repeat(v.frame, 3, axis=0), 3, axis=1)
    np.testing.assert_array_equal(screen[30:64 * 3, :, :], big[30:])  # below the "dream" label
    v.close()


def test_reset_draws_a_new_context_clip(parts, clips):
    v = make_viewer(parts, clips)
    v.run(max_frames=3)
    first = v.frame.copy()
    v.run(max_frames=1, events=[tap(pygame.K_r)])
    assert (v.episode, v.t, v.actions, v.total_reward) == (2, 0, [], 0.0)
    assert not np.array_equal(v.frame, first)
    v.close()


# ------------------------------------------------------------------ real env side by side
def test_real_env_follows_the_dream_side_by_side(parts, maze):
    v = make_viewer(parts, MemoryMazeContext(env=maze), show_real=False)
    seed, start = v.real.seed, v.real.frame.copy()
    v.run(max_frames=3, events=[[down(pygame.K_UP)], [down(pygame.K_LEFT)], [up(pygame.K_LEFT)]])
    assert v.real.steps == 0 and len(v.real.pending) == 3  # hidden: only queued
    v.run(max_frames=1, events=[tap(pygame.K_SPACE) + tap(pygame.K_v)])  # shown while paused
    assert v.show_real and v.real.steps == v.t == 3  # caught up at once
    v.run(max_frames=2, events=[tap(pygame.K_SPACE)])
    assert v.real.steps == v.t == 5 and v.real.actions == v.actions
    assert v.image(with_real=True).shape == (64 * 2, 2 * 64 * 2, 3)
    assert pygame.display.get_surface().get_width() == 2 * 64 * 2
    assert "real" in v.overlay_text()[0]

    # The real side is the env reset from the context's seed and stepped with the dream's actions:
    # redoing that by hand lands on the same frame.
    real_frame = v.real.frame.copy()
    context_rng = np.random.default_rng(0)  # the viewer's seed: first draws pick the context
    _, context_actions = MemoryMazeContext(env=maze).sample(context_rng, T0)
    assert maze.np_random_seed == seed
    obs, _ = maze.reset(seed=seed)
    for a in list(context_actions) + v.actions:
        obs, *_ = maze.step(a)
    np.testing.assert_array_equal(obs, real_frame)
    assert not np.array_equal(start, real_frame)

    # R: a new context clip resets the real env too (from another seed).
    v.run(max_frames=1, events=[tap(pygame.K_r)])
    assert v.t == v.real.steps == 0 and v.real.seed != seed
    v.close()


# ------------------------------------------------------------------ recording
@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_c_records_a_readable_video(parts, clips, tmp_path, suffix):
    path = tmp_path / f"take{suffix}"
    v = make_viewer(parts, clips, record_path=path)
    assert v.recorder is not None  # record_path: recording from the start
    v.run(max_frames=3, events=[[], [], tap(pygame.K_c)])  # stops before frame 2's step
    assert v.saved == [path]
    frames = imageio.mimread(path, memtest=False)
    assert len(frames) == 3  # the start frame + 2 steps
    assert frames[0].shape[:2] == (128, 128)
    v.run(max_frames=3, events=[tap(pygame.K_SPACE), tap(pygame.K_c), tap(pygame.K_n)])
    v.close()  # closing finishes the second take
    second = tmp_path / f"take-2{suffix}"
    assert v.saved == [path, second]
    frames = imageio.mimread(second, memtest=False)
    assert len(frames) == 2  # paused: the frame on screen + one single step
    big = np.repeat(np.repeat(v.frame, 2, axis=0), 2, axis=1).astype(int)
    last = np.asarray(frames[-1])[..., :3].astype(int)
    assert np.abs(last - big)[LABEL_HEIGHT:].mean() < 12  # lossy codecs; the rows under the label
    assert np.abs(last - label_panels(big.astype(np.uint8), ["dream"])).mean() < 12  # labelled "dream"
    assert np.abs(last - big)[:LABEL_HEIGHT, :20].mean() > 20  # ... which is drawn over the frame


# ------------------------------------------------------------------ agent loading and the command
def test_sb3_agent_loads_and_acts(parts, clips, tmp_path):
    from stable_baselines3 import PPO

    from worldsim.envs.dream import DreamEnv

    model = PPO("CnnPolicy", DreamEnv(model=parts[0], codec=parts[1], context=clips, context_frames=T0,
                                     sampler_steps=1), n_steps=8, batch_size=8, seed=0, device="cpu")
    model.save(tmp_path / "agent.zip")
    policy = load_sb3_policy(tmp_path / "agent.zip")
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert policy(frame) == int(model.predict(frame, deterministic=True)[0])
    (tmp_path / "junk.zip").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="PPO, A2C or DQN"):
        load_sb3_policy(tmp_path / "junk.zip")


def _app():
    import typer

    from worldsim.commands.play import play

    app = typer.Typer()
    app.command()(play)  # a one-command app runs `play` directly: no subcommand name on the line
    return app


def test_play_without_checkpoint_says_how_to_get_one():
    result = CliRunner().invoke(_app(), [])
    assert result.exit_code == 2
    assert "--checkpoint" in result.output and "worldsim train" in result.output


def test_play_command_records_from_a_saved_checkpoint(parts, tmp_path):
    from worldsim.codec.checkpoint import save_codec
    from worldsim.data.minari_writer import DatasetWriter, Episode
    from worldsim.train.checkpoint import save_checkpoint
    from worldsim.train.ema import EMA

    import gymnasium as gym

    model, codec = parts
    save_codec(codec, tmp_path / "codec")
    save_checkpoint(tmp_path / "wm", step=1, model=model, model_config=model.cfg.to_dict(),
                    optimizer=torch.optim.AdamW(model.parameters()), ema=EMA(model),
                    extra={"codec": {"path": str(tmp_path / "codec"), "config": codec.config.to_dict()},
                           "sigma_data": model.sigma_data})
    rng = np.random.default_rng(1)
    writer = DatasetWriter("play/test-v0", gym.spaces.Box(0, 255, (64, 64, 3), np.uint8), gym.spaces.Discrete(6),
                           root=tmp_path / "data")
    no = np.zeros(9, bool)
    frames = rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    writer.append(Episode(frames, rng.integers(0, 6, 9), np.zeros(9), no, no))
    out = tmp_path / "play.gif"
    result = CliRunner().invoke(_app(), [
        "--checkpoint", str(tmp_path / "wm"), "--dataset", str(writer.path), "--record", str(out),
        "--max-frames", "3", "--fps", "0", "--scale", "1", "--sampler-steps", "1", "--context-frames", str(T0),
    ])
    assert result.exit_code == 0, result.output
    assert f"saved {out}" in result.output and "real side" in result.output  # --real is on by default
    assert len(imageio.mimread(out)) == 4  # the context's last frame + 3 dream steps


# ------------------------------------------------------------------ the live maze in its own process
MAZE_9 = "worldsim/MemoryMaze-9x9-v0"
PLAY = [sys.executable, "-m", "worldsim.cli", "play"]


def reference_frames(seed: int, actions) -> np.ndarray:
    """What the real side must show: a separate rgb_array Memory Maze (in a worker of its own)
    given the context the viewer's seed picks, then `actions`: (1 + len(actions), 64, 64, 3)."""
    env = SubprocessEnv(MAZE_9, render_mode="rgb_array")
    try:
        context, _ = MemoryMazeContext(env=env).sample(np.random.default_rng(seed), T0)
        return np.stack([context[-1]] + [env.step(a)[0] for a in actions])
    finally:
        env.close()


def test_real_side_equals_a_separate_env_frame_for_frame(parts, maze):
    walk = iter([A[a] for a in ("forward", "forward", "forward_left", "turn_left", "forward", "forward_right",
                                "noop", "turn_right", "forward", "forward")] * 2)
    v = make_viewer(parts, MemoryMazeContext(env=maze), show_real=True, seed=3, policy=lambda frame: next(walk))
    v.handle_events(tap(pygame.K_TAB))  # agent mode: the walk above moves through the maze
    shown = [v.real.frame.copy()]
    for _ in range(20):
        v.run(max_frames=1)
        shown.append(v.real.frame.copy())
    assert v.real.steps == v.t == 20 and v.real.actions == v.actions and len(set(v.actions)) > 2
    expected = reference_frames(3, v.actions)
    np.testing.assert_array_equal(np.stack(shown), expected)
    assert len({f.tobytes() for f in expected}) > 10  # it moved: this is not one frame repeated
    # ... and the window shows it, upscaled, left of the dream (below the "real" label).
    screen = pygame.surfarray.array3d(pygame.display.get_surface()).transpose(1, 0, 2)
    big = np.repeat(np.repeat(expected[-1], 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(screen[20:128, 0:128], big[20:])
    dream_big = np.repeat(np.repeat(v.frame, 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(screen[20:128, 128:256], dream_big[20:])
    v.close()


def test_v_without_a_real_env_says_so_in_one_row_and_keeps_the_key_help(parts, clips):
    v = make_viewer(parts, clips, scale=6)
    v.run(max_frames=2, events=[[], tap(pygame.K_v) + tap(pygame.K_SPACE)])  # as with --dataset
    assert v.status == NO_REAL and not v.show_real and v.paused
    width = 64 * 6 - 8
    rows = v._overlay_rows(width)
    help_rows = _wrap(v.overlay_text()[-1], v._font, width)
    assert len(rows) <= OVERLAY_ROWS
    assert rows[-len(help_rows):] == help_rows  # the key help is all there, at the bottom
    assert NO_REAL in rows  # the message in one row, uncut
    v.status = "saved " + "/very/long/path" * 20 + ".mp4"  # too long for a row: cut, help kept
    rows = v._overlay_rows(width)
    assert rows[-len(help_rows):] == help_rows and any(r.endswith("...") for r in rows)
    v.close()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return save_tiny_run(tmp_path_factory.mktemp("play"))


def play_env(**extra) -> dict[str, str]:
    """The environment of a `worldsim play` subprocess: no inherited display settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("SDL_VIDEODRIVER", "DISPLAY")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def play_args(tiny_run, *more) -> list[str]:
    return [*PLAY, "--checkpoint", str(tiny_run), "--sampler-steps", "1", "--context-frames", str(T0), *map(str, more)]


def test_play_headless_records_the_real_maze_not_noise(tiny_run, tmp_path):
    # SDL's "offscreen" driver (what pygame picks with no display) renders through EGL, as
    # MuJoCo does: in one process the maze frames turned to noise after two steps.
    out, n, scale = tmp_path / "rec.mp4", 12, 2
    done = subprocess.run(play_args(tiny_run, "--max-frames", n, "--fps", 0, "--scale", scale, "--record", out),
                          env=play_env(SDL_VIDEODRIVER="offscreen"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    video = np.stack(imageio.mimread(out, memtest=False))[..., :3].astype(int)
    assert video.shape == (n + 1, 64 * scale, 2 * 64 * scale, 3)  # the start frame + n steps
    # Real on the left, dream on the right (as `worldsim dream` writes), each labelled at the top.
    real = video[:, :, :64 * scale].reshape(n + 1, 64, scale, 64, scale, 3).mean(axis=(2, 4))
    expected = reference_frames(0, [A["noop"]] * n).astype(int)  # no keys pressed: noop
    below = -(-LABEL_HEIGHT // scale)  # the 64 px rows under the label
    errors = np.abs(real - expected)[:, below:].mean(axis=(1, 2, 3))
    assert errors.max() < 8, errors  # H.264 loses ~2 levels; noise is ~60 off
    big = np.repeat(np.repeat(expected, scale, axis=1), scale, axis=2).astype(np.uint8)
    for i in (0, n):  # the label area too: the frame with "real" / "dream" drawn on it
        labelled = label_panels(np.concatenate([big[i], video[i, :, 64 * scale:].astype(np.uint8)], axis=1),
                                ["real", "dream"])
        assert np.abs(video[i, :LABEL_HEIGHT].astype(int) - labelled[:LABEL_HEIGHT]).mean() < 12
        assert np.abs(video[i, :LABEL_HEIGHT, :20].astype(int) - big[i, :LABEL_HEIGHT, :20]).mean() > 20


# ------------------------------------------------------------------ a real window (Xvfb)
XVFB, XWD, XDOTOOL = (shutil.which(tool) for tool in ("Xvfb", "xwd", "xdotool"))


@pytest.fixture
def xvfb():
    """The display name of a fresh Xvfb server (on a free display number it picks itself)."""
    if XVFB is None or XWD is None:
        pytest.skip("needs an X server: install Xvfb and xwd (Debian packages xvfb and x11-apps)")
    read_fd, write_fd = os.pipe()
    server = subprocess.Popen([XVFB, "-displayfd", str(write_fd), "-screen", "0", "800x600x24", "-nolisten", "tcp"],
                              pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], 30)
        number = os.read(read_fd, 32).decode().strip() if ready else ""
        assert number.isdigit(), "Xvfb did not start"
        yield f":{number}"
    finally:
        os.close(read_fd)
        server.terminate()
        server.wait(10)


def screenshot(display: str) -> np.ndarray:
    """The X screen as (H, W, 3) uint8, read with xwd (a TrueColor ZPixmap, 24 or 32 bits per pixel)."""
    data = subprocess.run([XWD, "-root", "-silent", "-display", display], capture_output=True, check=True,
                          timeout=30).stdout
    fields = np.frombuffer(data[:100], ">u4").astype(np.int64)
    header_size, width, height, byte_order = fields[0], fields[4], fields[5], fields[7]
    bits_per_pixel, bytes_per_line, masks, n_colours = fields[11], fields[12], fields[14:17], fields[19]
    assert bits_per_pixel in (24, 32), f"unexpected xwd format: {bits_per_pixel} bits per pixel"
    start = header_size + 12 * n_colours  # after the window name and the colour map
    rows = np.frombuffer(data[start:start + height * bytes_per_line], np.uint8).reshape(height, bytes_per_line)
    n_bytes = int(bits_per_pixel) // 8
    pixel_bytes = rows[:, :n_bytes * width].reshape(height, width, n_bytes).astype(np.int64)
    significance = range(n_bytes) if byte_order == 0 else range(n_bytes - 1, -1, -1)  # 0: LSB first
    words = sum(pixel_bytes[..., i] << (8 * k) for i, k in enumerate(significance))
    channels = [(words & mask) >> (int(mask).bit_length() - 8) for mask in masks]  # 8-bit red, green, blue
    return np.stack(channels, axis=-1).astype(np.uint8)


def xdotool(display: str, *args) -> None:
    subprocess.run([XDOTOOL, *map(str, args)], env={**os.environ, "DISPLAY": display}, check=True,
                   capture_output=True, timeout=30)


def test_play_window_under_xvfb_shows_the_real_maze_and_takes_keys(xvfb, tiny_run):
    # Before the real side moved to a worker process, this died at the first frame with
    # "X Error ... BadAccess ... X_GLXMakeCurrent": GLX (the window) and EGL (MuJoCo) in one process.
    scale, keys = 2, XDOTOOL is not None
    size = (2 * 64 * scale, 64 * scale + OVERLAY_ROWS * 16 + 6)  # (width, height) of the window
    max_frames = 400 if keys else 24  # with keys, Esc ends it
    proc = subprocess.Popen(play_args(tiny_run, "--max-frames", max_frames, "--fps", 4, "--scale", scale),
                            env=play_env(DISPLAY=xvfb), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:  # the window: whatever is not black on Xvfb's black screen
            assert proc.poll() is None, f"worldsim play exited early:\n{proc.communicate()[1]}"
            assert time.monotonic() < deadline, "no window appeared"
            shot = screenshot(xvfb)
            ys, xs = np.nonzero(shot.any(axis=-1))
            if len(xs) and (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == size:
                break
            time.sleep(0.5)
        if keys:
            # With no window manager the keyboard goes to the window under the pointer.
            xdotool(xvfb, "mousemove", (xs.min() + xs.max()) // 2, (ys.min() + ys.max()) // 2)
            xdotool(xvfb, "key", "space")  # pause: the frames must hold still (the fps text may not)
            time.sleep(1.0)
            shot = screenshot(xvfb)
            time.sleep(1.0)
            frames = slice(ys.min(), ys.min() + 64 * scale)
            np.testing.assert_array_equal(screenshot(xvfb)[frames], shot[frames])
        top, left = ys.min(), xs.min()
        real = shot[top + 20:top + 64 * scale:scale, left:left + 64 * scale:scale]  # the left panel
        # No keys moved the agent (noop actions): the real side is the separate env's frame after
        # some number of noop steps, pixel for pixel (rows under the "real" label).
        expected = reference_frames(0, [A["noop"]] * 60)[:, 10:]
        assert real.std() > 10  # a picture, not a blank panel
        assert min(np.abs(real.astype(int) - e).mean() for e in expected) == 0
        if keys:
            xdotool(xvfb, "key", "Escape")
        out, err = proc.communicate(timeout=60 if keys else 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "X Error" not in err
