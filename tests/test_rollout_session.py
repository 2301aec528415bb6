"""RolloutSession with a real tiny world model and a real tiny codec (random init, fixed seeds)."""

import numpy as np
import pytest
import torch

from worldsim.codec.autoencoder import FrameCodec, preset
from worldsim.model.config import make_config
from worldsim.model.world_model import WorldModel
from worldsim.rollout.session import RolloutSession

torch.set_num_threads(1)  # tiny models on a shared 2-core box: threads only add overhead


def tiny_pair(variant: str = "lssvwm", **overrides):
    torch.manual_seed(0)
    codec = FrameCodec(preset("tiny")).eval()  # 64x64x3 -> (4, 16, 16)
    cfg = make_config("tiny", variant, latent_channels=4, latent_grid=(16, 16), patch=2, **overrides)
    model = WorldModel(cfg).eval()
    # adaLN-Zero starts every branch closed and the output layer at zero: open them so the
    # streams depend on their past and on the actions (otherwise the checks below are vacuous).
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model, codec


def context(B: int, T0: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(B, T0, 64, 64, 3), dtype=np.uint8)
    actions = rng.integers(0, 6, size=(B, T0 - 1))
    return frames, actions


def test_streaming_matches_parallel_forward():
    model, codec = tiny_pair()
    B, T0, K = 2, 4, 5
    frames, actions = context(B, T0)
    session = RolloutSession(model, codec, batch=B, seed=1)
    session.reset(frames, actions)
    steps = np.random.default_rng(2).integers(0, 6, size=(K, B))
    results = [session.step(a) for a in steps]
    assert results[0].frames.shape == (B, 64, 64, 3) and results[0].frames.dtype == torch.uint8

    # The same clean latents through the parallel forward reproduce the cached rewards/terminations.
    with torch.no_grad():
        ctx = codec.encode(torch.as_tensor(frames))  # (B, T0, C, h, w)
        latents = torch.cat([ctx, torch.stack([r.latents for r in results], 1)], 1)  # (B, T0 + K, C, h, w)
        acts = torch.cat([torch.full((B, 1), 6), torch.as_tensor(actions), torch.as_tensor(steps.T)], 1)
        no_action = torch.zeros(B, T0 + K, dtype=torch.bool)
        no_action[:, 0] = True
        out = model(latents, torch.zeros(B, T0 + K), acts, no_action=no_action)
    rewards = torch.stack([r.rewards for r in results], 1)
    logits = torch.stack([r.termination_logits for r in results], 1)
    torch.testing.assert_close(rewards, out.reward[:, T0:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, out.termination_logit[:, T0:], atol=1e-4, rtol=1e-4)
    assert rewards.std() > 0  # the heads do depend on the stream


def test_fork_and_select():
    model, codec = tiny_pair()
    frames, actions = context(2, 3)
    session = RolloutSession(model, codec, batch=2)
    session.reset(frames, actions, seeds=[10, 11])
    session.step([1, 2])
    forked = session.fork(3)
    assert forked.batch == 6 and session.batch == 2
    out = forked.step([4] * 6)
    # Copies of one stream with the same generator state dream the same frame ...
    for b in range(2):
        for k in range(1, 3):
            assert torch.equal(out.frames[3 * b], out.frames[3 * b + k])
    assert not torch.equal(out.frames[0], out.frames[3])
    # ... and the parent, stepped with the same actions, agrees with its forks.
    parent = session.step([4, 4])
    torch.testing.assert_close(parent.latents, out.latents[[0, 3]], atol=1e-5, rtol=1e-5)
    # Different seeds diverge.
    picked = session.select([1, 1])
    picked.generators[1] = torch.Generator().manual_seed(999)
    diverged = picked.step([0, 0])
    assert not torch.equal(diverged.frames[0], diverged.frames[1])
    with pytest.raises(IndexError):
        session.select([2])


def test_state_size_constant_for_lssvwm_growing_for_causal_full():
    for variant, grows in (("lssvwm", False), ("causal_full", True)):
        model, codec = tiny_pair(variant)
        session = RolloutSession(model, codec, batch=1, sampler_steps=1, seed=0)
        session.reset(*context(1, 2))
        sizes = [session.state_nbytes()]
        for _ in range(50):
            session.step([1])
            sizes.append(session.state_nbytes())
        if grows:
            assert sizes[-1] > sizes[0] and all(b > a for a, b in zip(sizes, sizes[1:]))
        else:
            assert len(set(sizes)) == 1


@pytest.mark.parametrize("variant", ["lssvwm", "causal_full", "mamba_only"])
def test_reset_streams_with_short_context_matches_fresh_streams(variant):
    """Stream 1 restarts mid-rollout from a context shorter than the attention window (9 frames in
    the tiny preset); afterwards every stream dreams what a single-stream session from its own
    context dreams. Stream 0, which never restarted, keeps dreaming its own future too."""
    model, codec = tiny_pair(variant)
    frames, actions = context(2, 5)
    session = RolloutSession(model, codec, batch=2)
    session.reset(frames, actions, seeds=[1, 2])
    alone0 = RolloutSession(model, codec, batch=1)
    alone0.reset(frames[:1], actions[:1], seeds=[1])
    for a in (0, 1, 2, 3, 4, 5):  # 5 + 6 frames: the ring has wrapped
        session.step([a, a])
        alone0.step([a])
    new_frames, new_actions = context(1, 3, seed=5)
    first = session.reset_streams([1], new_frames, new_actions, seeds=[7])
    alone1 = RolloutSession(model, codec, batch=1)
    assert torch.equal(first, alone1.reset(new_frames, new_actions, seeds=[7]))
    for a in (3, 1, 0, 5, 2, 4, 1, 0, 3, 2, 5):  # past the window again: the short context ages out
        both, one0, one1 = session.step([a, 5 - a]), alone0.step([a]), alone1.step([5 - a])
        for row, one in ((0, one0), (1, one1)):
            torch.testing.assert_close(both.latents[row : row + 1], one.latents, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(both.rewards[row : row + 1], one.rewards, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(both.termination_logits[row : row + 1], one.termination_logits,
                                       atol=1e-5, rtol=1e-5)


def test_reset_streams_longer_context_than_the_batch_has_run():
    """A causal_full batch one frame into its rollout takes a stream with a 6-frame context: the
    growing KV cache makes room for it, and both streams match their single-stream runs."""
    model, codec = tiny_pair("causal_full")
    frames, actions = context(2, 2)
    session = RolloutSession(model, codec, batch=2, sampler_steps=2)
    session.reset(frames, actions, seeds=[1, 2])
    session.step([0, 0])
    before = session.state_nbytes()
    alone0 = RolloutSession(model, codec, batch=1, sampler_steps=2)
    alone0.reset(frames[:1], actions[:1], seeds=[1])
    alone0.step([0])
    long_frames, long_actions = context(1, 6, seed=3)
    session.reset_streams([1], long_frames, long_actions, seeds=[4])
    assert session.state_nbytes() == 2 * before  # 3 frames -> 6 frames of keys and values per row
    alone1 = RolloutSession(model, codec, batch=1, sampler_steps=2)
    alone1.reset(long_frames, long_actions, seeds=[4])
    for a in (1, 2, 3):
        both, one0, one1 = session.step([a, a]), alone0.step([a]), alone1.step([a])
        torch.testing.assert_close(both.latents[:1], one0.latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(both.latents[1:], one1.latents, atol=1e-5, rtol=1e-5)
    # Restarting the long stream again with a short context frees the slots nobody holds any more.
    session.reset_streams([1], *context(1, 2, seed=6))
    assert session.state_nbytes() == before * 6 // 3  # stream 0: 3 + 3 frames; stream 1: 2
    with pytest.raises(ValueError, match="distinct"):
        session.reset_streams([0, 0], *context(2, 2))


def test_bad_inputs_raise_clear_errors():
    model, codec = tiny_pair()
    session = RolloutSession(model, codec, batch=2)
    with pytest.raises(RuntimeError, match="reset"):
        session.step([0, 0])
    frames, actions = context(2, 3)
    with pytest.raises(ValueError, match="shape"):
        session.reset(frames, actions[:, :1])  # T0 frames need T0 - 1 actions
    with pytest.raises(TypeError, match="uint8"):
        session.reset(frames.astype(np.float32), actions)
    session.reset(frames, actions)
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        session.step([0, 6])
    with pytest.raises(TypeError, match="integers"):
        session.step([0.5, 1.0])
    with pytest.raises(ValueError, match="shape"):
        session.step([0, 1, 2])
    assert session.step([0, 1]).frames.shape == (2, 64, 64, 3)  # still usable


def reference_step(session: RolloutSession, actions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`RolloutSession.step` written the plain way: every denoiser call commits to its own copy of
    the cache (the optimised step reads the cache without copying it). -> latents, rewards, logits."""
    from worldsim.diffusion.sampler import sample_next_frames

    model, a = session.model, torch.as_tensor(np.asarray(actions))
    with torch.no_grad():
        latent = sample_next_frames(lambda x, s: model.step(x, s, a, session.cache.clone()).denoised,
                                    tuple(session.latents.shape), session.generators, session.sampler_steps,
                                    **session.sampler_kwargs)
        out = model.step(latent, torch.zeros(session.batch), a, session.cache)
    session.latents = latent
    return latent, out.reward, out.termination_logit


@pytest.mark.parametrize("variant", ["lssvwm", "causal_full", "mamba_only"])
def test_step_matches_the_plain_reference_step(variant):
    model, codec = tiny_pair(variant)
    frames, actions = context(3, 4)
    fast, plain = RolloutSession(model, codec, batch=3), RolloutSession(model, codec, batch=3)
    fast.reset(frames, actions, seeds=[1, 2, 3])
    plain.reset(frames, actions, seeds=[1, 2, 3])
    for a in np.random.default_rng(4).integers(0, 6, size=(6, 3)):
        out = fast.step(a)
        latents, rewards, logits = reference_step(plain, a)
        torch.testing.assert_close(out.latents, latents, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.rewards, rewards, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.termination_logits, logits, atol=1e-6, rtol=1e-6)
    assert fast.frames_seen == plain.frames_seen == 4 + 6


def twin_sessions() -> tuple[RolloutSession, RolloutSession]:
    """Two sessions of one tiny model reset from the same context and seeds: they dream alike."""
    model, codec = tiny_pair()
    frames, actions = context(2, 3)
    twins = RolloutSession(model, codec, batch=2), RolloutSession(model, codec, batch=2)
    for session in twins:
        session.reset(frames, actions, seeds=[5, 6])
    return twins


def test_step_without_decoding_dreams_the_same_latents():
    pixels, latent_only = twin_sessions()
    for a in ([1, 2], [3, 0], [5, 5]):
        with_frames, without = pixels.step(a), latent_only.step(a, decode=False)
        assert without.frames is None and with_frames.frames.shape == (2, 64, 64, 3)
        assert torch.equal(with_frames.latents, without.latents)
        assert torch.equal(with_frames.rewards, without.rewards)
        assert torch.equal(with_frames.terminated, without.terminated)


def test_step_timings_add_up_per_phase_and_change_nothing():
    timed, plain = twin_sessions()
    timings: dict[str, float] = {}
    for a in ([1, 2], [3, 0]):
        out = timed.step(a, timings=timings)
        assert torch.equal(out.latents, plain.step(a).latents)
    assert set(timings) == {"denoise", "commit", "decode"} and min(timings.values()) > 0
    before = dict(timings)
    timed.step([0, 0], decode=False, timings=timings)
    assert timings["denoise"] > before["denoise"] and timings["decode"] - before["decode"] < 1e-3


def test_observe_predicts_like_step_and_then_continues_from_the_real_frame():
    model, codec = tiny_pair()
    frames, actions = context(2, 6, seed=3)
    forced = RolloutSession(model, codec, batch=2)
    forced.reset(frames[:, :4], actions[:, :3], seeds=[5, 6])
    free = forced.select([0, 1])  # same cache and generator states
    predicted = forced.observe(actions[:, 3], frames=frames[:, 4], decode=True)
    dreamed = free.step(actions[:, 3])
    torch.testing.assert_close(predicted.latents, dreamed.latents)  # the prediction is step's sample
    assert torch.equal(predicted.frames, dreamed.frames)
    # ... but the state now holds the real frame: as if the context had included it.
    truth = RolloutSession(model, codec, batch=2)
    truth.reset(frames[:, :5], actions[:, :4], seeds=[1, 2])
    forced.generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    torch.testing.assert_close(forced.step(actions[:, 4]).latents, truth.step(actions[:, 4]).latents, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="frames or as latents"):
        forced.observe(actions[:, 4])


def test_extend_in_chunks_leaves_the_state_of_one_prefill():
    model, codec = tiny_pair()
    frames, actions = context(2, 9, seed=4)
    chunked = RolloutSession(model, codec, batch=2)
    chunked.reset(frames[:, :3], actions[:, :2], seeds=[7, 8])
    chunked.extend(frames[:, 3:6], actions[:, 2:5])  # action i led to frame i + 1
    chunked.extend(frames[:, 6:], actions[:, 5:])
    whole = RolloutSession(model, codec, batch=2)
    whole.reset(frames, actions, seeds=[7, 8])
    torch.testing.assert_close(chunked.latents, whole.latents)
    step = np.array([1, 4])
    torch.testing.assert_close(chunked.step(step).latents, whole.step(step).latents, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"discrete actions must have shape \(2, 2\)"):
        chunked.extend(frames[:, :2], actions[:, :1])


def test_commit_advances_like_a_step_that_sampled_those_latents():
    model, codec = tiny_pair()
    frames, actions = context(1, 4, seed=5)
    sampled = RolloutSession(model, codec, batch=1)
    sampled.reset(frames, actions, seeds=[3])
    committed = sampled.select([0])
    first = sampled.step([2])
    out = committed.commit([2], first.latents)
    torch.testing.assert_close(out.rewards, first.rewards)
    for session in (sampled, committed):  # commit draws no noise: give both the same generator state
        session.generators = [torch.Generator().manual_seed(4)]
    torch.testing.assert_close(sampled.step([1]).latents, committed.step([1]).latents)


def test_fold_commit_saves_a_call_and_dreams_the_same_first_frame():
    model, codec = tiny_pair(prev_frames=2)
    frames, actions = context(2, 4, seed=6)
    plain = RolloutSession(model, codec, batch=2, sampler_steps=3, fold_commit=False)
    folded = RolloutSession(model, codec, batch=2, sampler_steps=3, fold_commit=True)
    for session in (plain, folded):
        session.reset(frames, actions, seeds=[1, 2])
    calls = {"n": 0}
    forward = model.precond.forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return forward(*args, **kwargs)

    model.precond.forward = counting
    try:
        first_plain, n_plain = plain.step([0, 3]), calls["n"]
        first_folded = folded.step([0, 3])
    finally:
        del model.precond.forward
    assert (n_plain, calls["n"] - n_plain) == (4, 3)  # 3 denoiser calls + a commit, or 3 in all
    # The last call denoises the same input either way: the same first frame.
    torch.testing.assert_close(first_folded.latents, first_plain.latents, atol=1e-5, rtol=1e-4)
    assert folded.cache.frames_seen == plain.cache.frames_seen
    torch.testing.assert_close(folded.cache.recent[:, -1], first_folded.latents)  # the direct path gets the clean frame
    assert folded.step([1, 1]).latents.shape == (2, 4, 16, 16)
    with pytest.raises(ValueError, match="fold_commit needs a solver"):
        RolloutSession(model, codec, batch=1, fold_commit=True, sampler_kwargs={"solver": "heun"})


def test_the_dreams_two_calls_take_their_own_settings_and_callers_still_override_them():
    from worldsim.rollout.session import DREAM_SAMPLER, DREAM_SAMPLERS, DREAM_STEPS

    model, codec = tiny_pair()
    two = RolloutSession(model, codec, batch=1)
    assert two.sampler_steps == DREAM_STEPS == 2
    assert two.sampler_kwargs == {**DREAM_SAMPLER, **DREAM_SAMPLERS[2]} and two.sampler_kwargs["final_extrapolation"] > 0
    assert RolloutSession(model, codec, batch=1, sampler_steps=3).sampler_kwargs == DREAM_SAMPLER
    mine = RolloutSession(model, codec, batch=1, sampler_kwargs={"final_extrapolation": 0.0, "churn": 0.5})
    assert mine.sampler_kwargs == {**DREAM_SAMPLER, **DREAM_SAMPLERS[2], "final_extrapolation": 0.0, "churn": 0.5}
    # The extrapolation alone changes the frame the same calls and noise dream.
    mine = RolloutSession(model, codec, batch=1, sampler_kwargs={"final_extrapolation": 0.0})
    frames, actions = context(1, 3, seed=7)
    for session in (two, mine):
        session.reset(frames, actions, seeds=[3])
    assert not torch.allclose(two.step([2]).latents, mine.step([2]).latents)


def test_shape_caches_filled_while_dreaming_still_serve_training():
    """Masks and RoPE tables are cached per shape; the dream's denoiser calls run in inference mode,
    and an inference tensor in a cache would break the trainer's backward pass later in the same
    process (it dreams sample videos mid-training)."""
    from worldsim.model import frame_attention, ssd
    from worldsim.model.rope import VideoRoPE

    rope = VideoRoPE(head_dim=16, grid=(3, 3))
    with torch.inference_mode():
        cached = [*ssd._segment_masks(13, torch.device("cpu"), torch.float32),
                  frame_attention._cached_band_mask(3, 5, 4, torch.device("cpu")),
                  *rope.cos_sin(7, 2, "cpu"), *rope._spatial(torch.device("cpu"), torch.float32)]
    assert not any(t.is_inference() for t in cached)


def test_every_dream_default_takes_the_simulators_sampler_steps():
    """DREAM_STEPS is the simulator's number of denoiser calls per dreamed frame. Every config,
    env and command that takes sampler_steps with a default (written as a literal so `--help`
    stays torch-free) must default to it, so changing it is one measured decision in one place."""
    import dataclasses
    import inspect

    from worldsim.agents.imagination import AgentTrainConfig
    from worldsim.bench.rollout import RolloutBenchConfig
    from worldsim.commands.agent import agent_train
    from worldsim.commands.dream import dream
    from worldsim.commands.play import play
    from worldsim.dream import DreamConfig
    from worldsim.envs.dream import DreamEnv
    from worldsim.envs.dream_vector import DreamVectorEnv
    from worldsim.evaluation.memory import MemoryEvalConfig
    from worldsim.evaluation.prediction import PredictionEvalConfig
    from worldsim.evaluation.realism import RealismEvalConfig
    from worldsim.rollout.session import DREAM_STEPS
    from worldsim.train.gpu_job import JobConfig
    from worldsim.viewer.app import ViewerConfig

    defaults = {}
    for config in (AgentTrainConfig, RolloutBenchConfig, DreamConfig, MemoryEvalConfig, PredictionEvalConfig,
                   RealismEvalConfig, JobConfig, ViewerConfig):
        defaults[config.__name__] = next(f.default for f in dataclasses.fields(config) if f.name == "sampler_steps")
    for fn in (RolloutSession.__init__, DreamEnv.__init__, DreamVectorEnv.__init__, agent_train, dream, play):
        default = inspect.signature(fn).parameters["sampler_steps"].default
        defaults[fn.__qualname__] = getattr(default, "default", default)  # typer's OptionInfo holds it
    assert defaults == dict.fromkeys(defaults, DREAM_STEPS)


def test_decoding_beside_the_commit_changes_nothing_but_the_thread(monkeypatch):
    model, codec = tiny_pair(prev_frames=2)
    frames, actions = context(2, 4, seed=8)
    serial = RolloutSession(model, codec, batch=2, overlap_decode=False)
    overlapped = RolloutSession(model, codec, batch=2, overlap_decode=True)
    for session in (serial, overlapped):
        session.reset(frames, actions, seeds=[3, 4])
    seen = []
    decode = codec.decode

    def recording(*args, **kwargs):  # where, and in which grad mode, each decode ran
        import threading

        seen.append((threading.current_thread().name, torch.is_grad_enabled()))
        return decode(*args, **kwargs)

    monkeypatch.setattr(codec, "decode", recording)
    for a in ([0, 1], [2, 3], [4, 5]):
        want, got = serial.step(a), overlapped.step(a)
        assert torch.equal(want.frames, got.frames)
        assert torch.equal(want.latents, got.latents) and torch.equal(want.rewards, got.rewards)
    assert seen[0::2] == [("MainThread", False)] * 3
    assert all(name.startswith("worldsim-decode") and not grad for name, grad in seen[1::2])
    assert overlapped.step([0, 0], decode=False).frames is None  # planners skip the decode either way
    # None decides per step: from batch 8, where the session's threads leave a CPU core free.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert RolloutSession(model, codec, batch=8).overlap_decode
    assert not RolloutSession(model, codec, batch=1).overlap_decode
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not RolloutSession(model, codec, batch=8).overlap_decode


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_decodes_on_its_own_thread():
    import os

    model, codec = tiny_pair()
    frames, actions = context(1, 3, seed=9)
    session = RolloutSession(model, codec, batch=1, overlap_decode=True)
    session.reset(frames, actions, seeds=[5])
    session.step([1])  # the parent's decode thread now exists
    pid = os.fork()
    if pid == 0:  # the child: a step must not wait on a thread it did not inherit
        try:
            ok = session.step([2]).frames.shape == (1, 64, 64, 3)
        finally:
            os._exit(0 if ok else 1)
    import signal
    import time

    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:  # still waiting on the thread it never had
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's step hung on the parent's decode thread")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_a_bfloat16_session_runs_a_copy_and_hands_back_float32():
    model, codec = tiny_pair()
    frames, actions = context(2, 3)
    session = RolloutSession(model, codec, batch=2, model_bf16=True)
    session.reset(frames, actions, seeds=[5, 6])
    out = session.step([1, 2])
    assert session.model is not model and next(session.model.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched
    assert session.cache.layers[0].kv.keys.dtype == torch.bfloat16
    assert out.latents.dtype == out.rewards.dtype == torch.float32 and out.frames.dtype == torch.uint8
    assert session.fork(2).model is session.model  # forks share the copy


def test_the_bundled_model_in_bfloat16_predicts_what_float32_does(monkeypatch):
    """Teacher-forced next latents from real clips: bfloat16 and float32 (same noise) differ far
    less than either differs from the real next frame (the held-out figures are in the README)."""
    from worldsim.bundled import PACKAGE_BUNDLE_DIR, is_bundle, load_bundled

    monkeypatch.delenv("WORLDSIM_BUNDLE_DIR", raising=False)
    if not is_bundle(PACKAGE_BUNDLE_DIR):
        pytest.skip(f"no bundled model in this checkout ({PACKAGE_BUNDLE_DIR})")
    bundle = load_bundled()
    frames, actions = bundle.clips.frames, bundle.clips.actions  # (4, 9, 64, 64, 3), (4, 8)
    C = 5  # context frames; the other 4 are predicted
    with torch.no_grad():
        real = bundle.codec.encode(torch.as_tensor(frames[:, C:]))  # (4, T - C, C, h, w)
    predicted = {}
    for bf16 in (False, True):
        session = RolloutSession(bundle.model, bundle.codec, batch=4, model_bf16=bf16)
        session.reset(frames[:, :C], actions[:, : C - 1], seeds=[1, 2, 3, 4])
        predicted[bf16] = torch.stack([session.observe(actions[:, C - 1 + t], latents=real[:, t]).latents
                                       for t in range(4)], 1)
    gap = (predicted[True] - predicted[False]).pow(2).mean()
    error = (predicted[False] - real[:, :4]).pow(2).mean()
    assert gap < 0.02 * error, (gap, error)  # 0.003 when written


def test_bfloat16_models_are_chosen_only_where_they_pay(monkeypatch):
    from worldsim.rollout.session import bf16_model_pays
    from worldsim.utils import cpu

    monkeypatch.setattr(cpu, "has_amx", lambda: True)
    assert bf16_model_pays("cpu", 16) and bf16_model_pays(torch.device("cpu"), 64)
    assert not bf16_model_pays("cpu", 8)  # no faster there: small ops, not the matmuls, take the time
    assert not bf16_model_pays("cuda", 64)
    monkeypatch.setattr(cpu, "has_amx", lambda: False)
    assert not bf16_model_pays("cpu", 64)  # emulated without AMX


def test_a_bfloat16_copy_of_a_live_session_leaves_it_as_it_was():
    model, codec = tiny_pair()
    frames, actions = context(2, 3)
    live, twin = (RolloutSession(model, codec, batch=2) for _ in range(2))
    for session in (live, twin):
        session.reset(frames, actions, seeds=[5, 6])
    fast = live.in_bfloat16()
    assert fast.model_bf16 and next(fast.model.parameters()).dtype == torch.bfloat16
    assert fast.cache.layers[0].kv.keys.dtype == torch.bfloat16 and fast.frames_seen == live.frames_seen
    dreamed = fast.step([1, 2], decode=False).latents
    assert live.cache.layers[0].kv.keys.dtype == torch.float32 and live.frames_seen == twin.frames_seen
    exact = live.step([1, 2], decode=False).latents  # the live stream dreams what its twin does
    assert torch.equal(exact, twin.step([1, 2], decode=False).latents)
    # The same noise in both: the bfloat16 frame is the float32 one up to bfloat16 rounding.
    assert (dreamed - exact).pow(2).mean() < 1e-3 * exact.pow(2).mean()
    assert fast.in_bfloat16().model is fast.model  # already bfloat16: a plain copy of the streams
    assert live.in_bfloat16().model is fast.model  # the live session copies its model once
