"""The real environments: Gymnasium / SB3 compliance, faithfulness to upstream, seeding, infos.

Memory Maze envs take ~3 s to create and ~1.5 s per reset on a CPU, so each registered env is
made once per module (`made_env`) and tests that need a fresh env are few.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import worldsim.envs
from worldsim.envs import REAL_ENV_IDS
from worldsim.envs.crafter import ACHIEVEMENT_NAMES, INVENTORY_NAMES, CrafterEnv
from worldsim.envs.memory_maze import ACTION_NAMES, EPISODE_STEPS, MemoryMazeEnv, _upstream_tasks
from worldsim.envs.subprocess_env import SubprocessEnv, WorkerError

MAZE_9 = "worldsim/MemoryMaze-9x9-v0"
CRAFTER = "worldsim/Crafter-v0"
# The render and close checks build extra envs through env.spec.make(); the render and close code
# is shared by all maze sizes, so it is checked on one maze and on Crafter.
FULL_CHECK_IDS = {MAZE_9, CRAFTER}
SMALL_CRAFTER_AREA = 32  # world generation is ~4x faster than the default 64x64 area


@pytest.fixture(scope="module")
def made_env():
    """`made_env(env_id)`: the module's one unwrapped env of that id, made with gym.make.

    Crafter is made with a smaller world: generating the default 64x64 one takes ~1.5 s per
    reset and the checkers reset a dozen times; the code under test is the same.
    """
    envs = {}

    def get(env_id: str) -> gym.Env:
        if env_id not in envs:
            kwargs = {"area": SMALL_CRAFTER_AREA} if env_id == CRAFTER else {}
            envs[env_id] = gym.make(env_id, **kwargs).unwrapped
        return envs[env_id]

    yield get
    for env in envs.values():
        env.close()


def _composer_env(env: MemoryMazeEnv):
    return env._composer_env


def _upstream_composer_env(dm_env):
    while hasattr(dm_env, "env"):
        dm_env = dm_env.env
    return dm_env


def _teleport_onto_current_target(composer_env) -> None:
    """Place the walker on the current target the way upstream's spawn places it: the walker
    moves by slide joints, so its pose is its attachment frame at (x, y, 0)."""
    task, physics = composer_env.task, composer_env.physics
    target_x, target_y = physics.bind(task._targets[task._current_target_ix].geom).xpos[:2]
    task._walker.set_pose(physics, position=np.array([target_x, target_y, 0.0]))


# ------------------------------------------------------------------ registration
def test_real_env_ids_are_registered_once():
    assert REAL_ENV_IDS == (
        "worldsim/MemoryMaze-9x9-v0",
        "worldsim/MemoryMaze-11x11-v0",
        "worldsim/MemoryMaze-13x13-v0",
        "worldsim/MemoryMaze-15x15-v0",
        "worldsim/Crafter-v0",
    )
    for size, env_id in zip((9, 11, 13, 15), REAL_ENV_IDS):
        spec = gym.spec(env_id)
        assert spec.entry_point == "worldsim.envs.memory_maze:MemoryMazeEnv"
        assert spec.kwargs == {"size": size}
        assert spec.max_episode_steps == EPISODE_STEPS[size]
    assert gym.spec(CRAFTER).entry_point == "worldsim.envs.crafter:CrafterEnv"
    # Importing the package again (e.g. a reload) must not fail on already registered ids.
    assert importlib.reload(worldsim.envs).REAL_ENV_IDS == REAL_ENV_IDS


# ------------------------------------------------------------------ API checkers
@pytest.mark.slow
@pytest.mark.parametrize("env_id", REAL_ENV_IDS)
def test_gymnasium_env_checker(env_id, made_env):
    env = made_env(env_id)
    full = env_id in FULL_CHECK_IDS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gymnasium_check_env(env, skip_render_check=not full, skip_close_check=not full)
    checker_warnings = [str(w.message) for w in caught if "gymnasium" in w.filename]
    assert checker_warnings == []


@pytest.mark.slow
@pytest.mark.parametrize("env_id", REAL_ENV_IDS)
def test_sb3_env_checker(env_id, made_env):
    env = made_env(env_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_check_env(env, warn=True)
    sb3_warnings = [str(w.message) for w in caught if "stable_baselines3" in w.filename]
    assert sb3_warnings == []


# ------------------------------------------------------------------ Memory Maze
@pytest.mark.slow
def test_memory_maze_reproduces_upstream_episodes(made_env):
    """reset(seed=s) on a used env == upstream's memory_maze_9x9(seed=s), target touches included.

    This also checks the vectorised target-contact test against upstream's original one.
    """
    env = made_env(MAZE_9)
    # History the seeded reset must erase. Seed 0 spawns the agent on a target, which leaves that
    # target `activated` into the next reset, where it changes upstream's random draws.
    env.reset(seed=0)
    assert any(target.activated for target in env._task._targets)
    upstream = _upstream_tasks().memory_maze_9x9(seed=1, global_observables=True)
    try:
        for episode in range(2):
            seed = 1 if episode == 0 else None
            frame, info = env.reset(seed=seed)
            obs = upstream.reset().observation
            np.testing.assert_array_equal(frame, obs["image"])
            np.testing.assert_array_equal(env.maze_layout, obs["maze_layout"])
            np.testing.assert_array_equal(info["agent_pos"], obs["agent_pos"])

            actions = np.random.default_rng(episode).integers(0, len(ACTION_NAMES), 6)
            for action in actions:
                frame, reward, terminated, truncated, info = env.step(action)
                timestep = upstream.step(int(action))
                np.testing.assert_array_equal(frame, timestep.observation["image"])
                np.testing.assert_array_equal(info["agent_dir"], timestep.observation["agent_dir"])
                assert reward == timestep.reward

            old_target = info["target_index"]
            _teleport_onto_current_target(_composer_env(env))
            _teleport_onto_current_target(_upstream_composer_env(upstream))
            frame, reward, terminated, truncated, info = env.step(0)
            timestep = upstream.step(0)
            assert reward == timestep.reward == 1.0
            assert info["target_index"] != old_target  # touching picks a new target
            np.testing.assert_array_equal(frame, timestep.observation["image"])
            np.testing.assert_array_equal(info["target_pos"], timestep.observation["target_pos"])
            assert not terminated and not truncated
    finally:
        upstream.close()


def test_memory_maze_steps_infos_and_seeds(made_env):
    """Moving, turning and standing still; infos fixed and consistent; seeds give other mazes.

    One test, because every Memory Maze reset costs over a second.
    """
    env = made_env(MAZE_9)
    env.reset(seed=5)
    other_layout = env.maze_layout
    _, info = env.reset(seed=11)
    layout = env.maze_layout
    assert layout.shape == (9, 9) and layout.dtype == np.uint8
    assert set(np.unique(layout)) == {0, 1}
    assert not np.array_equal(layout, other_layout)
    infos = [info]

    start, heading = info["agent_pos"], info["agent_dir"]
    for _ in range(2):
        infos.append(env.step(ACTION_NAMES.index("noop"))[4])
    assert np.linalg.norm(infos[-1]["agent_pos"] - start) < 1e-3
    for _ in range(4):
        infos.append(env.step(ACTION_NAMES.index("forward"))[4])
    moved = infos[-1]["agent_pos"] - start
    assert np.linalg.norm(moved) > 0.3
    assert np.dot(moved, heading) / np.linalg.norm(moved) > 0.9
    infos.append(env.step(ACTION_NAMES.index("turn_left"))[4])
    assert not np.allclose(infos[-1]["agent_dir"], infos[-2]["agent_dir"])
    for action in np.random.default_rng(5).integers(0, 6, 10):
        infos.append(env.step(action)[4])

    expected = {
        "agent_pos": ((2,), np.float64),
        "agent_dir": ((2,), np.float64),
        "target_color": ((3,), np.float64),
        "target_pos": ((2,), np.float64),
        "targets_pos": ((3, 2), np.float64),
        "target_index": ((), np.int64),
    }
    for info in infos:
        assert {k: (np.shape(v), np.asarray(v).dtype) for k, v in info.items()} == expected
        np.testing.assert_array_equal(info["targets_pos"][info["target_index"]], info["target_pos"])
        assert np.isclose(np.linalg.norm(info["agent_dir"]), 1.0)
        # Positions are in grid cells: the agent and every target stand on free floor.
        for x, y in [info["agent_pos"], *info["targets_pos"]]:
            assert 0 < x < 9 and 0 < y < 9
            assert layout[int(y), int(x)] == 1
        assert np.all((info["target_color"] >= 0) & (info["target_color"] <= 1))

    for bad_action in (6, -1, 1.5, "forward", np.array([1, 2]), None):
        with pytest.raises(ValueError, match=r"not in the action space Discrete\(6\)") as error:
            env.step(bad_action)
        assert repr(bad_action) in str(error.value)


def test_memory_maze_upstream_time_limit_truncates(made_env):
    env = made_env(MAZE_9)
    composer_env = _composer_env(env)
    full_limit = composer_env._time_limit
    # Shorten upstream's own (physics-time) limit to 3 control steps of 0.25 s.
    composer_env._time_limit = 0.75 - 1e-3
    try:
        env.reset(seed=0)
        results = [env.step(0)[2:4] for _ in range(3)]
        assert results == [(False, False), (False, False), (False, True)]
        with pytest.raises(RuntimeError, match="call reset"):
            env.step(0)
    finally:
        composer_env._time_limit = full_limit


def test_memory_maze_lifecycle_errors_and_rgb_render():
    with pytest.raises(ValueError, match="size must be one of"):
        MemoryMazeEnv(size=10)
    with pytest.raises(ValueError, match="render_mode"):
        MemoryMazeEnv(render_mode="bogus")
    env = MemoryMazeEnv(9, render_mode="rgb_array")
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(1)
    with pytest.raises(RuntimeError, match="before reset"):
        env.render()
    with pytest.raises(RuntimeError, match="after reset"):
        env.maze_layout
    frame, _ = env.reset(seed=3)
    np.testing.assert_array_equal(env.render(), frame)
    frame = env.step(1)[0]
    np.testing.assert_array_equal(env.render(), frame)
    env.close()
    env.close()  # closing twice is allowed
    with pytest.raises(RuntimeError, match="closed"):
        env.reset()


# ------------------------------------------------------------------ Crafter
def test_crafter_reset_matches_upstream():
    import crafter

    env = CrafterEnv(area=SMALL_CRAFTER_AREA)
    env.reset(seed=1)  # history that the seeded reset must erase
    upstream = crafter.Env(area=(SMALL_CRAFTER_AREA,) * 2, seed=7)
    for episode in range(2):
        frame, info = env.reset(seed=7 if episode == 0 else None)
        np.testing.assert_array_equal(frame, upstream.reset())
        # One step before any creature can despawn: rewards and infos are crafter's own.
        action = 5  # "do"
        frame, reward, terminated, truncated, info = env.step(action)
        up_frame, up_reward, done, up_info = upstream.step(action)
        np.testing.assert_array_equal(frame, up_frame)
        assert reward == up_reward and not terminated and not truncated
        assert list(info["inventory"]) == [up_info["inventory"][n] for n in INVENTORY_NAMES]
        assert list(info["achievements"]) == [up_info["achievements"][n] for n in ACHIEVEMENT_NAMES]
        np.testing.assert_array_equal(info["player_pos"], up_info["player_pos"])


def test_crafter_episodes_are_reproducible():
    """Same seed and actions, two env instances (different object addresses): same episode.

    Upstream crafter diverges here once it despawns a creature from a chunk holding several,
    because it picks the creature by index into a set ordered by memory address.
    """
    actions = np.random.default_rng(0).integers(0, 17, 300)
    runs = []
    for _ in range(2):
        env = CrafterEnv(area=SMALL_CRAFTER_AREA)
        frames, rewards = [env.reset(seed=7)[0]], []
        for action in actions:
            frame, reward, terminated, truncated, _ = env.step(action)
            frames.append(frame)
            rewards.append(reward)
            if terminated or truncated:
                break
        runs.append((np.stack(frames), rewards))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_crafter_info_is_fixed():
    env = CrafterEnv(area=SMALL_CRAFTER_AREA)
    infos = [env.reset(seed=3)[1]]
    for action in np.random.default_rng(3).integers(0, 17, 30):
        infos.append(env.step(action)[4])
    for info in infos:
        assert {k: (v.shape, v.dtype) for k, v in info.items()} == {
            "inventory": ((16,), np.int64),
            "achievements": ((22,), np.int64),
            "player_pos": ((2,), np.int64),
            "player_facing": ((2,), np.int64),
        }
        assert tuple(np.abs(info["player_facing"])) in {(0, 1), (1, 0)}
    assert list(infos[0]["inventory"][:4]) == [9, 9, 9, 9]  # health, food, drink, energy


def test_crafter_death_terminates_and_length_truncates():
    env = CrafterEnv(area=SMALL_CRAFTER_AREA, length=3)
    env.reset(seed=0)
    assert [env.step(0)[2:4] for _ in range(3)] == [(False, False), (False, False), (False, True)]
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(0)

    env.reset(seed=0)
    env._crafter._player.health = 0  # the player dies during the next step
    _, reward, terminated, truncated, info = env.step(0)
    assert terminated and not truncated
    assert info["inventory"][INVENTORY_NAMES.index("health")] == 0
    assert reward < 0  # crafter's reward counts health lost


def test_crafter_time_limit_from_make():
    env = gym.make(CRAFTER, max_episode_steps=2, area=SMALL_CRAFTER_AREA)
    env.reset(seed=0)
    assert [env.step(0)[3] for _ in range(2)] == [False, True]
    env.close()


def test_crafter_rejects_bad_actions():
    env = CrafterEnv(area=SMALL_CRAFTER_AREA)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(0)
    env.reset(seed=0)
    for bad_action in (17, -1, 2.0, "noop", np.array([0, 1])):
        with pytest.raises(ValueError, match=r"not in the action space Discrete\(17\)") as error:
            env.step(bad_action)
        assert repr(bad_action) in str(error.value)


def test_crafter_rejects_bad_arguments():
    bad_kwargs = ({"size": 16}, {"size": 64.0}, {"area": 4}, {"length": 0}, {"render_mode": "x"})
    for kwargs in bad_kwargs:
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            CrafterEnv(**kwargs)


def test_human_render_shows_frames_and_needs_pygame(monkeypatch):
    env = CrafterEnv(area=SMALL_CRAFTER_AREA, render_mode="human")
    env.reset(seed=0)
    env.step(1)
    assert env.render() is None
    env.close()
    monkeypatch.setitem(sys.modules, "pygame", None)  # as if pygame were not installed
    with pytest.raises(ImportError, match="pygame"):
        CrafterEnv(render_mode="human")


# ------------------------------------------------------------------ GL contexts in their own processes
def test_subprocess_env_forwards_the_env_and_reports_errors_and_death(made_env):
    local = made_env(MAZE_9)
    env = SubprocessEnv(MemoryMazeEnv, size=9, render_mode="rgb_array")
    try:
        assert (env.observation_space, env.action_space) == (local.observation_space, local.action_space)
        assert env.render_mode == "rgb_array" and env.metadata == local.metadata
        frame, info = env.reset(seed=5)
        local_frame, local_info = local.reset(seed=5)
        np.testing.assert_array_equal(frame, local_frame)
        assert env.np_random_seed == 5 and info.keys() == local_info.keys()
        for action in (1, 1, 2, 4):  # frame for frame the env of this process
            frame = env.step(action)[0]
            np.testing.assert_array_equal(frame, local.step(action)[0])
        np.testing.assert_array_equal(env.render(), frame)
        np.testing.assert_array_equal(env.get_attr("maze_layout"), local.maze_layout)
        with pytest.raises(ValueError, match="not in the action space") as raised:  # the env's own error
            env.step(7)
        assert "worker process" in raised.value.__notes__[0]
        env.step(0)  # still usable
        os.kill(env.worker.pid, signal.SIGKILL)
        with pytest.raises(WorkerError, match="killed by SIGKILL during 'step'"):
            env.step(0)
    finally:
        env.close()
    env.close()  # closing again (also after a death) does nothing
    with pytest.raises(WorkerError, match="closed"):
        env.reset()
    with pytest.raises(ValueError, match="size must be one of"):  # failures while making it
        SubprocessEnv(MemoryMazeEnv, size=10)
    made = SubprocessEnv(MAZE_9)  # an env id: gymnasium.make in the worker
    assert made.spec.id == MAZE_9 and made.render_mode is None
    made.close()


def test_subprocess_env_steps_while_this_process_works(made_env):
    local = made_env(MAZE_9)
    env = SubprocessEnv(MemoryMazeEnv, size=9, render_mode="rgb_array")
    try:
        env.reset(seed=5)
        local.reset(seed=5)
        for action in (1, 2, 4):
            env.step_async(action)
            with pytest.raises(RuntimeError, match="'step' is in flight"):
                env.render()  # one request at a time: refused before anything is sent
            frame, reward, terminated, truncated, _ = env.step_wait()
            local_frame, local_reward, *_ = local.step(action)
            np.testing.assert_array_equal(frame, local_frame)
            assert reward == local_reward and not (terminated or truncated)
        with pytest.raises(RuntimeError, match="no call"):
            env.step_wait()
        env.step_async(7)  # the env's own error comes with the result
        with pytest.raises(ValueError, match="not in the action space"):
            env.step_wait()
        np.testing.assert_array_equal(env.render(), local_frame)  # still where this process's twin stands
        env.step_async(0)  # closing with a step in flight
    finally:
        env.close()
    assert env.closed


def test_two_human_render_memory_mazes_in_one_process(made_env, monkeypatch):
    # SDL's "offscreen" driver (pygame's pick with no display) draws through EGL like MuJoCo: the
    # window shared this process's EGL display and the second close() failed with EGL_BAD_CONTEXT
    # (under X it was `X_GLXMakeCurrent BadAccess` at once). Windows now live in worker processes.
    monkeypatch.setenv("SDL_VIDEODRIVER", "offscreen")
    local = made_env(MAZE_9)
    for _ in range(2):
        env = gym.make(MAZE_9, render_mode="human")
        frames = [env.reset(seed=2)[0]] + [env.step(a)[0] for a in (1, 1, 3)]
        assert env.render() is None
        window = env.unwrapped._window._worker
        assert window is not None and not window.closed
        env.close()
        assert window.closed
        with pytest.raises(ProcessLookupError):
            os.kill(window.pid, 0)  # the window's process has exited
        expected = [local.reset(seed=2)[0]] + [local.step(a)[0] for a in (1, 1, 3)]
        np.testing.assert_array_equal(np.stack(frames), np.stack(expected))
