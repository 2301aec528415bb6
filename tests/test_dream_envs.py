"""Dream envs with a real tiny world model and a real tiny codec (random init, fixed seeds)."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.vector import AutoresetMode

from worldsim.envs.dream import ClipContext, DreamEnv, MinariContext, make_dream_env
from worldsim.envs.dream_vector import DreamVectorEnv
from worldsim.envs.sb3_vec import DreamSB3VecEnv
from tiny_world import tiny_parts as _tiny_parts

torch.set_num_threads(1)  # tiny models on a shared 2-core box: threads only add overhead
T0 = 9  # = the tiny preset's attention window (shorter contexts are tested too)


def tiny_parts(**overrides):
    model, codec = _tiny_parts(0, **overrides)
    rng = np.random.default_rng(0)
    episodes = [rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8) for n in (12, 15)]
    context = ClipContext(episodes, [rng.integers(0, 6, len(e) - 1) for e in episodes])
    return dict(model=model, codec=codec, context=context, context_frames=T0)


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def test_dream_env_passes_both_checkers(parts):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = DreamEnv(**parts, horizon=20, sampler_steps=1, render_mode="rgb_array")
    gym_check_env(env, skip_render_check=False)
    sb3_check_env(env, warn=True)
    obs, _ = env.reset(seed=3)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert np.array_equal(env.render(), obs)


def test_seed_fixes_the_episode_and_horizon_truncates(parts):
    env = DreamEnv(**parts, horizon=3, sampler_steps=2)
    runs = []
    for _ in range(2):
        obs, _ = env.reset(seed=7)
        frames, done, truncated = [obs], False, False
        while not done:
            obs, r, terminated, truncated, _ = env.step(1)
            frames.append(obs)
            done = terminated or truncated
        runs.append((np.stack(frames), truncated, len(frames)))
    assert np.array_equal(runs[0][0], runs[1][0])
    assert runs[0][2] <= 4 and (runs[0][1] or runs[0][2] < 4)  # truncated exactly at the horizon
    other, _ = env.reset(seed=8)
    assert not np.array_equal(other, runs[0][0][0])
    with pytest.raises(RuntimeError, match="reset"):
        while True:
            env.step(0)


@pytest.mark.parametrize("bad, error", [
    (6, ValueError), (-1, ValueError), (1.5, TypeError), (np.float32(np.nan), TypeError),
    (np.array([1, 2]), TypeError), (True, TypeError),
])
def test_bad_actions_raise_and_env_stays_usable(parts, bad, error):
    env = DreamEnv(**parts, horizon=5, sampler_steps=1)
    env.reset(seed=0)
    with pytest.raises(error):
        env.step(bad)
    env.reset(seed=0)
    assert env.step(2)[0].shape == (64, 64, 3)


def test_continuous_actions_nan_and_range():
    p = tiny_parts(action_kind="continuous", n_actions=0, action_dim=2)
    env = DreamEnv(**{**p, "context": ClipContext([np.zeros((10, 64, 64, 3), np.uint8)], [np.zeros((9, 2), np.float32)])},
                   sampler_steps=1)
    env.reset(seed=0)
    for bad in (np.array([np.nan, 0], np.float32), np.array([2.0, 0], np.float32), np.zeros(3, np.float32), np.zeros(2, int)):
        with pytest.raises((ValueError, TypeError)):
            env.step(bad)
    assert env.step(np.array([0.5, -0.5], np.float32))[0].dtype == np.uint8


def test_context_clip_shorter_than_required(parts):
    env = DreamEnv(**{**parts, "context_frames": 20})  # the episodes hold 12 and 15 frames
    with pytest.raises(ValueError, match="shorter than required"):
        env.reset(seed=0)


def test_minari_context(tmp_path):
    from worldsim.data.minari_writer import DatasetWriter, Episode

    rng = np.random.default_rng(1)
    writer = DatasetWriter("dream/test-v0", gym.spaces.Box(0, 255, (64, 64, 3), np.uint8), gym.spaces.Discrete(6), root=tmp_path)
    no = np.zeros(11, bool)
    writer.append(Episode(rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8), rng.integers(0, 6, 11), np.zeros(11), no, no))
    source = MinariContext(writer.path, T0)
    frames, actions = source.sample(np.random.default_rng(0), T0)
    assert frames.shape == (T0, 64, 64, 3) and actions.shape == (T0 - 1,)
    with pytest.raises(Exception, match="12|11|20"):  # no 20-step window in an 11-step episode
        MinariContext(writer.path, 20)


def test_registered_entry_point_without_model_explains():
    with pytest.raises(ValueError, match="checkpoint=.*worldsim train"):
        make_dream_env()


@pytest.mark.parametrize("context_frames", [T0, 3])  # 3 < the window: restarted rows mask the rest
def test_vector_env_equals_independent_envs(parts, context_frames):
    parts = {**parts, "context_frames": context_frames}
    B, seed, steps = 3, 11, 8
    venv = DreamVectorEnv(B, **parts, horizon=3, sampler_steps=2)
    singles = [DreamEnv(**parts, horizon=3, sampler_steps=2) for _ in range(B)]
    obs, _ = venv.reset(seed=seed)
    expected = [e.reset(seed=seed + i)[0] for i, e in enumerate(singles)]
    assert venv.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    rng = np.random.default_rng(0)
    ended = [False] * B
    n_resets = 0
    for _ in range(steps):
        np.testing.assert_allclose(obs.astype(int), np.stack(expected).astype(int), atol=2)
        actions = rng.integers(0, 6, B)
        obs, rewards, term, trunc, _ = venv.step(actions)
        for i, env in enumerate(singles):
            if ended[i]:  # NEXT_STEP: this step is sub-env i's reset, reward 0, not done
                expected[i] = env.reset()[0]
                assert rewards[i] == 0 and not term[i] and not trunc[i]
                ended[i] = False
                n_resets += 1
            else:
                expected[i], r, t, tr, _ = env.step(int(actions[i]))
                assert abs(r - rewards[i]) < 1e-3 and (t, tr) == (term[i], trunc[i])
                ended[i] = t or tr
    assert n_resets >= B  # horizon 3 in 8 steps: every sub-env restarted at least once


@pytest.mark.parametrize("flag, option, smallest", [("decode_bf16", "fast_decode", 8), ("model_bf16", "fast_model", 16)])
def test_vector_env_goes_bf16_only_where_it_pays(parts, monkeypatch, flag, option, smallest):
    from worldsim.utils import cpu

    def chosen(num_envs: int, **kwargs) -> bool:
        return getattr(DreamVectorEnv(num_envs, **parts, horizon=3, **kwargs).session, flag)

    monkeypatch.setattr(cpu, "has_amx", lambda: True)
    assert chosen(smallest) and not chosen(smallest // 2) and not chosen(smallest, **{option: False})
    monkeypatch.setattr(cpu, "has_amx", lambda: False)
    assert not chosen(smallest)


def test_vector_env_decoding_in_bf16_stays_within_a_few_grey_levels(parts):
    # Forced on, frames stay within a couple of grey levels of the float32 ones (same noise).
    fast, exact = (DreamVectorEnv(2, **parts, horizon=3, fast_decode=f) for f in (True, False))
    for env in (fast, exact):
        env.reset(seed=4)
    a, b = fast.step(np.array([1, 2]))[0], exact.step(np.array([1, 2]))[0]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 4


def test_vector_env_same_step_autoreset(parts):
    venv = DreamVectorEnv(2, **parts, horizon=2, sampler_steps=1, autoreset_mode="same_step")
    obs, _ = venv.reset(seed=0)
    single = DreamEnv(**parts, horizon=2, sampler_steps=1)
    first, _ = single.reset(seed=0)
    for _ in range(2):  # horizon 2: sub-env 0 ends on step 1 or 2, in both envs alike
        last, _, t, tr, _ = single.step(0)
        obs, _, term, trunc, info = venv.step(np.zeros(2, np.int64))
        assert (t or tr) == (term[0] or trunc[0])
        if t or tr:
            break
    assert info["_final_obs"][0] and (t or tr)
    np.testing.assert_allclose(info["final_obs"][0].astype(int), last.astype(int), atol=2)
    np.testing.assert_allclose(obs[0].astype(int), single.reset()[0].astype(int), atol=2)  # new episode already
    with pytest.raises(ValueError, match="shape"):
        venv.step(np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="range"):
        venv.step(np.array([0, 9]))
    assert venv.step(np.zeros(2, np.int64))[0].shape == (2, 64, 64, 3)


def test_sb3_adapter_conventions_and_ppo_smoke():
    from stable_baselines3 import PPO

    parts = tiny_parts()
    with torch.no_grad():  # a model that never predicts termination: episodes end by truncation
        parts["model"].net.heads.mlp[-1].bias[1] = -100.0
    vec = DreamSB3VecEnv(2, **parts, horizon=4, sampler_steps=1)
    vec.seed(5)
    obs = vec.reset()
    assert obs.shape == (2, 64, 64, 3)
    saw_truncation = False
    for _ in range(5):
        obs, rewards, dones, infos = vec.step(np.array([1, 2]))
        for i in np.flatnonzero(dones):
            assert infos[i]["terminal_observation"].shape == (64, 64, 3)
            assert infos[i]["terminal_observation"].dtype == np.uint8
            assert "TimeLimit.truncated" in infos[i]
            saw_truncation |= infos[i]["TimeLimit.truncated"]
        for i in np.flatnonzero(~dones):
            assert "terminal_observation" not in infos[i]
    assert saw_truncation

    model = PPO("CnnPolicy", vec, n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=256)
    assert model.num_timesteps >= 256


def test_dream_ids_are_registered_with_vector_entry_points():
    from worldsim.envs import DREAM_MEMORY_MAZE_IDS

    assert len(DREAM_MEMORY_MAZE_IDS) == 4
    for env_id in DREAM_MEMORY_MAZE_IDS:
        spec = gym.spec(env_id)
        assert spec.entry_point == "worldsim.envs.dream:make_dream_env"
        assert spec.vector_entry_point == "worldsim.envs.dream_vector:make_dream_vector_env"
    with pytest.raises(ValueError, match="checkpoint="):
        gym.make(DREAM_MEMORY_MAZE_IDS[0])


# ------------------------------------------------------------------ Gymnasium / SB3 with no glue
DREAM_9 = "worldsim/Dream-MemoryMaze-9x9-v0"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from tiny_world import save_tiny_bundle

    return save_tiny_bundle(tmp_path_factory.mktemp("bundle") / "dream-memory-maze-9x9")


@pytest.fixture
def installed_bundle(tiny_bundle, monkeypatch):
    """The tiny bundle as the installed one (checkpoint=None / "bundled"), and its clips as context."""
    from worldsim import bundled

    monkeypatch.setenv(bundled.ENV_VAR, str(tiny_bundle))
    return bundled.load_bundle_clips(tiny_bundle).context()


def test_make_sb3_vec_env_trains_ppo_on_the_bundled_model(installed_bundle):
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecEnv

    import worldsim.envs

    vec = worldsim.envs.make_sb3_vec_env(DREAM_9, num_envs=2, checkpoint=None, context=installed_bundle,
                                         sampler_steps=1, max_episode_steps=16, seed=0)
    assert isinstance(vec, VecEnv) and vec.num_envs == 2 and vec.observation_space.shape == (64, 64, 3)
    assert vec.get_attr("horizon") == [16, 16]
    model = PPO("CnnPolicy", vec, n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=256)
    assert model.num_timesteps >= 256
    assert [ep["l"] for ep in model.ep_info_buffer][:4] == [16, 16, 16, 16]  # VecMonitor logs the episodes
    vec.close()


def test_sb3_adapter_and_native_envs_load_a_checkpoint_themselves(installed_bundle, tmp_path):
    from tiny_world import save_tiny_run

    run = save_tiny_run(tmp_path)
    vec = DreamSB3VecEnv(2, checkpoint=str(run), context=installed_bundle, sampler_steps=1, horizon=3)
    assert vec.reset().shape == (2, 64, 64, 3)
    vec.close()
    # "bundled" is the shipped bundle, as None is.
    env = gym.make(DREAM_9, checkpoint="bundled", context=installed_bundle, sampler_steps=1)
    assert env.reset(seed=0)[0].shape == (64, 64, 3)
    env.close()
    with pytest.raises(ValueError, match="unknown env id 'worldsim/Dream-Typo-v0'"):
        import worldsim.envs

        worldsim.envs.make_sb3_vec_env("worldsim/Dream-Typo-v0", num_envs=2)


def test_dream_ids_have_an_episode_length_that_can_be_changed(installed_bundle):
    assert gym.spec(DREAM_9).max_episode_steps == 1000  # the real 9x9 maze's episode length
    env = gym.make(DREAM_9, context=installed_bundle, sampler_steps=1, max_episode_steps=3)
    env.reset(seed=0)
    ends = [env.step(0)[2:4] for _ in range(3)]
    assert ends == [(False, False), (False, False), (False, True)]  # truncated at step 3
    env.close()
    venv = gym.make_vec(DREAM_9, num_envs=2, context=installed_bundle, sampler_steps=1, max_episode_steps=2)
    assert venv.horizon == 2
    venv.close()
    assert gym.make_vec(DREAM_9, num_envs=2, context=installed_bundle, sampler_steps=1).horizon == 1000


def test_closed_envs_refuse_to_step_and_reset_options_are_checked(parts):
    env = DreamEnv(**parts, horizon=5, sampler_steps=1)
    with pytest.raises(ValueError, match=r"DreamEnv.reset got unknown options \['foo'\]; known options: none"):
        env.reset(seed=0, options={"foo": 1})
    env.reset(seed=0, options={})
    env.close()
    for call in (lambda: env.step(0), lambda: env.reset(seed=0)):
        with pytest.raises(RuntimeError, match="DreamEnv is closed"):
            call()

    venv = DreamVectorEnv(2, **parts, horizon=5, sampler_steps=1)
    with pytest.raises(ValueError, match=r"unknown options \['context'\]"):
        venv.reset(seed=0, options={"context": 1})
    venv.reset(seed=0)
    venv.close()
    with pytest.raises(RuntimeError, match="DreamVectorEnv is closed"):
        venv.step(np.zeros(2, np.int64))

    vec = DreamSB3VecEnv(2, **parts, horizon=5, sampler_steps=1)
    vec.set_options({"foo": 1})
    with pytest.raises(ValueError, match=r"unknown options \['foo'\]"):
        vec.reset()
    vec.close()
    with pytest.raises(RuntimeError, match="closed"):
        vec.step(np.zeros(2, np.int64))


@pytest.mark.parametrize("bad", ["7", 1.5, True, -1, np.float64(2.0), [0, "x"]])
def test_vector_env_seeds_must_be_integers(parts, bad):
    venv = DreamVectorEnv(2, **parts, horizon=5, sampler_steps=1)
    with pytest.raises(TypeError, match="seed"):
        venv.reset(seed=bad)
    venv.reset(seed=np.int64(3))  # numpy integers are integers
    venv.reset(seed=[4, 5])
    vec = DreamSB3VecEnv(2, **parts, horizon=5, sampler_steps=1)
    if not isinstance(bad, list):
        with pytest.raises(TypeError, match="seed must be a non-negative integer"):
            vec.seed(bad)
