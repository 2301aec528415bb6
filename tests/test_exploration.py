"""Exploration policies and the revisit finder: synthetic trajectories, hand-made mazes, and
short episodes in the real Memory Maze."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from worldsim.data.exploration import (
    Navigator,
    RandomWalk,
    Revisit,
    Spin,
    cell_of,
    corner_cells,
    maze_layout_of,
    room_cells,
    shortest_path,
    signed_angle_deg,
)
from worldsim.data.revisits import find_revisits

EAST, WEST, NORTH, SOUTH = (1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)


# ----------------------------------------------------------------- synthetic trajectories
def stay(pos, heading, n):
    return [pos] * n, [heading] * n


def walk(start, end, n):
    """n steps from `start` (excluded) to `end` (included), heading along the motion."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    heading = tuple((end - start) / np.linalg.norm(end - start))
    points = [tuple(start + (end - start) * k / n) for k in range(1, n + 1)]
    return points, [heading] * n


def trajectory(*segments):
    pos = [p for seg in segments for p in seg[0]]
    dirs = [d for seg in segments for d in seg[1]]
    return np.array(pos), np.array(dirs)


def out_and_back(final_heading):
    # 0..4 rest at the origin facing east; 5..204 walk 20 cells east; 205..404 walk back west;
    # 405..409 rest at the origin facing `final_heading`.
    return trajectory(
        stay((0, 0), EAST, 5),
        walk((0, 0), (20, 0), 200),
        walk((20, 0), (0, 0), 200),
        stay((0, 0), final_heading, 5),
    )


def test_out_and_back_is_one_revisit_last_seen_as_the_agent_left():
    pos, dirs = out_and_back(EAST)
    # Steps 0..9 (x <= 0.5) match the final pose; the arrival run 405..409 collapses to 405.
    assert find_revisits(pos, dirs, min_gap=100, pos_tol=0.55, dir_tol_deg=30) == [(405, 9)]


def test_revisit_needs_min_gap():
    pos, dirs = out_and_back(EAST)
    assert find_revisits(pos, dirs, min_gap=397, pos_tol=0.55, dir_tol_deg=30) == []
    assert find_revisits(pos, dirs, min_gap=396, pos_tol=0.55, dir_tol_deg=30) == [(405, 9)]


def test_same_place_other_heading_is_not_a_revisit():
    pos, dirs = out_and_back(WEST)  # the way back faces west all along: one continuous visit
    assert find_revisits(pos, dirs, min_gap=100, pos_tol=0.55, dir_tol_deg=30) == []
    pos, dirs = out_and_back(NORTH)  # nothing ever faced north at the origin before
    assert find_revisits(pos, dirs, min_gap=100, pos_tol=0.55, dir_tol_deg=30) == []


def test_standing_still_is_not_a_revisit():
    pos, dirs = trajectory(stay((3, 4), NORTH, 400))
    assert find_revisits(pos, dirs, min_gap=50) == []


def test_gap_is_measured_from_the_last_sighting():
    # Rest facing east at the origin at 0..4, 105..109 and 230..234; between them a trip north
    # (5..104) and a trip east (110..229), whose first steps 110, 111 still see the origin.
    pos, dirs = trajectory(
        stay((0, 0), EAST, 5),
        walk((0, 0), (0, 10), 50),
        walk((0, 10), (0, 0), 50),
        stay((0, 0), EAST, 5),
        walk((0, 0), (12, 0), 60),
        walk((12, 0), (0, 0), 60),
        stay((0, 0), EAST, 5),
    )
    assert find_revisits(pos, dirs, min_gap=100) == [(105, 4), (230, 111)]
    # At 230 the pose was last seen 119 steps before, though first seen 230 steps before.
    assert find_revisits(pos, dirs, min_gap=150) == []


def test_retracing_a_path_is_one_revisit():
    # The second trip north retraces the first one 105 steps later: every step of it revisits,
    # and the whole retrace is reported once.
    trip = [walk((0, 0), (0, 10), 50), walk((0, 10), (0, 0), 50)]
    pos, dirs = trajectory(stay((0, 0), EAST, 5), *trip, stay((0, 0), EAST, 5), *trip)
    assert find_revisits(pos, dirs, min_gap=100) == [(105, 4)]


def test_a_spot_where_the_old_visit_lingered_starts_a_new_entry():
    # Walk north with a 20-step stop at y=5 (38..57), come back south, walk north again
    # without stopping: the retrace is one run, except where it passes the old stop.
    pos, dirs = trajectory(
        walk((0, -0.2), (0, 5), 26),
        stay((0, 5), NORTH, 20),
        walk((0, 5), (0, 10), 25),
        walk((0, 10), (0, -0.2), 51),
        walk((0, -0.2), (0, 10), 51),
    )
    stop_end = 26 + 20 - 1
    found = find_revisits(pos, dirs, min_gap=60)
    assert len(found) == 2, found
    assert found[0][1] < 26  # the retrace starts by matching the first walk
    t_now, t_before = found[1]
    assert t_before == stop_end and np.linalg.norm(pos[t_now] - pos[stop_end]) <= 0.5


def test_dir_vectors_need_not_be_unit():
    pos, dirs = out_and_back(EAST)
    assert find_revisits(pos, dirs * 3.0, min_gap=100, pos_tol=0.55) == [(405, 9)]


@pytest.mark.parametrize(
    ("pos", "dirs", "kwargs", "message"),
    [
        (np.zeros((5, 3)), np.ones((5, 2)), {}, r"agent_pos must have shape \(T, 2\)"),
        (np.zeros((5, 2)), np.ones((4, 2)), {}, "same length"),
        (np.full((5, 2), np.nan), np.ones((5, 2)), {}, "NaN"),
        (np.zeros((5, 2)), np.zeros((5, 2)), {}, "zero vectors"),
        (np.zeros((5, 2)), np.ones((5, 2)), {"min_gap": 0}, "min_gap"),
        (np.zeros((5, 2)), np.ones((5, 2)), {"pos_tol": 0.0}, "pos_tol"),
        (np.zeros((5, 2)), np.ones((5, 2)), {"dir_tol_deg": 200.0}, "dir_tol_deg"),
    ],
)
def test_find_revisits_rejects_bad_input(pos, dirs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        find_revisits(pos, dirs, **{"min_gap": 10, **kwargs})


# ----------------------------------------------------------------------- maze planning
def layout_from(rows: list[str]) -> np.ndarray:
    """ASCII maze, top row first ('.' free, '#' wall) -> maze_layout[y, x], row 0 at the bottom."""
    return np.array([[c == "." for c in row] for row in reversed(rows)], dtype=np.uint8)


SNAKE = layout_from([
    ".####",
    ".#...",
    ".#.#.",
    "...#.",
    "####.",
])  # fmt: skip


def test_shortest_path_follows_the_only_corridor():
    path = shortest_path(SNAKE, (0, 4), (4, 0))
    assert path == [
        (0, 4), (0, 3), (0, 2), (0, 1), (1, 1), (2, 1), (2, 2), (2, 3), (3, 3), (4, 3),
        (4, 2), (4, 1), (4, 0),
    ]  # fmt: skip
    assert corner_cells(path) == [(0, 1), (2, 1), (2, 3), (4, 3), (4, 0)]


def test_shortest_path_in_an_open_room_is_manhattan():
    room = np.ones((6, 7), dtype=np.uint8)
    path = shortest_path(room, (1, 1), (5, 4))
    assert len(path) == 4 + 3 + 1
    assert all(abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 for a, b in zip(path, path[1:]))


def test_shortest_path_avoids_blocked_cells_when_it_can():
    ring = layout_from([
        "...",
        ".#.",
        "...",
    ])  # fmt: skip
    assert shortest_path(ring, (0, 0), (2, 0)) == [(0, 0), (1, 0), (2, 0)]
    detour = shortest_path(ring, (0, 0), (2, 0), blocked=frozenset({(1, 0)}))
    assert detour == [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0)]
    # The goal itself may be a blocked cell (the revisit policy's return trip).
    assert shortest_path(ring, (0, 0), (1, 0), blocked=frozenset({(1, 0)})) == [(0, 0), (1, 0)]


def test_shortest_path_unreachable_and_bad_cells():
    split = layout_from([".#.", ".#.", ".#."])
    assert shortest_path(split, (0, 0), (2, 2)) is None
    with pytest.raises(ValueError, match=r"start cell \(1, 0\) is not a free cell"):
        shortest_path(split, (1, 0), (2, 2))
    with pytest.raises(ValueError, match=r"goal cell \(5, 0\) is not a free cell"):
        shortest_path(split, (0, 0), (5, 0))


def test_room_cells_are_the_cells_of_wide_areas():
    maze = layout_from([
        "...#.",
        "...#.",
        ".....",
        "##.##",
    ])  # fmt: skip
    room = {(x, y) for x in range(3) for y in range(1, 4)}
    assert set(room_cells(maze)) == room


def test_geometry_helpers():
    assert cell_of(np.array([2.7, 0.2])) == (2, 0)
    assert signed_angle_deg(np.array(EAST), np.array(NORTH)) == pytest.approx(90.0)
    assert signed_angle_deg(np.array(EAST), np.array(SOUTH)) == pytest.approx(-90.0)


# --------------------------------------------------------------------------- random walk
def test_random_walk_persistence_sets_how_often_the_action_changes():
    env = gym.make("CartPole-v1")
    policy = RandomWalk(persistence=0.8)
    policy.reset(env, {}, np.random.default_rng(0))
    actions = np.array([policy.act(None, {}) for _ in range(20000)])
    assert set(actions.tolist()) == {0, 1}
    # A new action is drawn with probability 0.2 and differs from the old one half the time.
    assert np.mean(actions[1:] != actions[:-1]) == pytest.approx(0.2 * 0.5, rel=0.1)

    replay = RandomWalk(persistence=0.8)
    replay.reset(env, {}, np.random.default_rng(0))
    assert [replay.act(None, {}) for _ in range(200)] == actions[:200].tolist()


def test_random_walk_rejects_bad_settings():
    with pytest.raises(ValueError, match="persistence"):
        RandomWalk(persistence=1.0)
    with pytest.raises(ValueError, match="Discrete action space"):
        RandomWalk().reset(gym.make("Pendulum-v1"), {}, np.random.default_rng(0))


def test_maze_policies_refuse_envs_without_a_maze():
    with pytest.raises(ValueError, match="needs a Memory Maze env"):
        maze_layout_of(gym.make("CartPole-v1"), "navigator")
    with pytest.raises(ValueError, match="min_excursion"):
        Revisit(min_excursion=50, max_excursion=10)
    with pytest.raises(ValueError, match="epsilon"):
        Navigator(epsilon=1.5)


# ------------------------------------------------------------------- real Memory Maze
@pytest.fixture(scope="module")
def maze_env():
    import worldsim.envs  # noqa: F401

    env = gym.make("worldsim/MemoryMaze-9x9-v0")
    yield env
    env.close()


def run_policy(env, policy, *, env_seed, policy_seed, steps, stop=lambda: False):
    obs, info = env.reset(seed=env_seed)
    policy.reset(env, info, np.random.default_rng(policy_seed))
    pos, dirs, actions = [info["agent_pos"]], [info["agent_dir"]], []
    for _ in range(steps):
        action = policy.act(obs, info)
        obs, _, terminated, truncated, info = env.step(action)
        actions.append(action)
        pos.append(info["agent_pos"])
        dirs.append(info["agent_dir"])
        if terminated or truncated or stop():
            break
    return np.array(pos), np.array(dirs), actions


def test_navigator_reaches_its_goals(maze_env):
    policy = Navigator(epsilon=0.0)
    pos, _, actions = run_policy(maze_env, policy, env_seed=3, policy_seed=0, steps=150)
    assert len(policy.reached_goals) >= 2, policy.reached_goals
    layout = maze_env.unwrapped.maze_layout
    for step, goal in policy.reached_goals:
        assert cell_of(pos[step]) == goal
        assert layout[goal[1], goal[0]] == 1
    # It travels: a random walk of the same length stays within a few cells of its start.
    assert len({cell_of(p) for p in pos}) >= 10


def test_navigator_is_reproducible_from_env_and_policy_seeds(maze_env):
    runs = [
        run_policy(maze_env, Navigator(), env_seed=5, policy_seed=7, steps=40) for _ in range(2)
    ]
    assert runs[0][2] == runs[1][2]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])


def test_revisit_policy_returns_to_its_anchor_and_the_finder_sees_it(maze_env):
    min_gap = 30
    policy = Revisit(min_excursion=min_gap, max_excursion=40)
    pos, dirs, _ = run_policy(
        maze_env, policy, env_seed=1, policy_seed=1, steps=300,
        stop=lambda: len(policy.planned_revisits) >= 1,
    )  # fmt: skip
    assert policy.planned_revisits, "no revisit within 300 steps"
    found = find_revisits(pos, dirs, min_gap=min_gap, pos_tol=0.5, dir_tol_deg=30)
    for t_now, t_before in policy.planned_revisits:
        assert t_now - t_before >= min_gap
        assert np.linalg.norm(pos[t_now] - pos[t_before]) <= 0.5
        assert abs(signed_angle_deg(dirs[t_now], dirs[t_before])) <= policy.align_tol_deg
        # The finder reports the arrival (a few steps before the policy finishes aligning)
        # and a step of the anchor visit.
        assert any(
            t_now - 15 <= f_now <= t_now
            and abs(f_before - t_before) <= 15
            and f_now - f_before >= min_gap
            for f_now, f_before in found
        ), (policy.planned_revisits, found)


@pytest.mark.parametrize("look_prob", [0.0, 1.0])  # full turns only; looking aside and back only
def test_spin_policy_brings_its_views_back_and_the_finder_sees_them(maze_env, look_prob):
    policy = Spin(look_prob=look_prob)
    pos, dirs, actions = run_policy(
        maze_env, policy, env_seed=2, policy_seed=3, steps=400,
        stop=lambda: len(policy.planned_revisits) >= 3 and len(policy.turns) == 0,
    )  # fmt: skip
    assert len(policy.planned_revisits) >= 3, policy.planned_revisits
    found = find_revisits(pos, dirs, min_gap=16, pos_tol=0.5, dir_tol_deg=30)
    for t_now, t_before in policy.planned_revisits:
        gap = t_now - t_before
        assert 18 <= gap <= 60 and t_now < len(pos)
        assert np.linalg.norm(pos[t_now] - pos[t_before]) <= 0.1  # turned on the spot
        # A full turn is 20 actions of 18.4 degrees: 8 degrees over per turn; looking back is exact.
        turns = round(gap / Spin.FULL_TURN) if look_prob == 0.0 else 0
        assert abs(signed_angle_deg(dirs[t_now], dirs[t_before])) <= 8 * turns + 6, (t_now, t_before)
    # The finder reports each spot's first return past a 16-frame window (it collapses the run of
    # returns that follows, and dates a view from its last sighting), so it sees every spot.
    spots = {t_before: max(t for t, b in policy.planned_revisits if b == t_before) for _, t_before in policy.planned_revisits}
    for start, end in spots.items():
        assert any(start - 3 <= f_before and f_now <= end + 3 for f_now, f_before in found), (start, end, found)
