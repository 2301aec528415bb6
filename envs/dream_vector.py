"""A native batched dream: `num_envs` streams in ONE `RolloutSession`, one model call per step.

Sub-env i behaves exactly like a `DreamEnv` reset with seed + i: it has its own `np_random`, which
picks its context clips and seeds its sampler noise, in the same order as the single env. (From 8
sub-envs on a CPU with AMX the frames are decoded in bfloat16, `fast_decode`: the same dream, its
pixels within 2 grey levels of the single env's; `fast_decode=False` gives them exactly. From 16
sub-envs there the world model runs in bfloat16 as well, `fast_model`: another sample of the same
quality, not the single env's frames; `fast_model=False` keeps them. From 8
sub-envs on a CPU with a core the torch threads leave free, each step's frames are decoded on a
second thread while the commit call runs, `RolloutSession.overlap_decode`: the same frames, sooner.)

Auto-reset (metadata["autoreset_mode"]): NEXT_STEP by default (Gymnasium 1.x): the step that ends
sub-env i returns its last frame; the NEXT step ignores i's action, restarts it from new context
and returns the first frame with reward 0 and terminated = truncated = False. SAME_STEP (what the
SB3 adapter uses): the ending step already returns the new episode's first frame, and the last
frame goes to info["final_obs"] (with info["final_info"], both masked by info["_final_obs"]).
Restarting some streams re-prefills just their rows of the model cache from the new context and
overwrites them in the batch (`RolloutSession.reset_streams`); the other streams carry on.

Seeds are non-negative integers (one, or one per sub-env); `reset` knows no options; a closed env
refuses to step or reset. Stable-Baselines3 takes `worldsim.envs.make_sb3_vec_env(...)` instead.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from worldsim.codec.autoencoder import bf16_decode_pays
from worldsim.envs.dream import (
    FRAME_SHAPE, RENDER_FPS, SEED_BOUND, ContextSource, action_space_for, check_action, check_reset_options,
    closed_error, load_dream_model, make_context, resolve_dream_checkpoint,
)
from worldsim.rollout.session import RolloutSession, bf16_model_pays


class DreamVectorEnv(VectorEnv):
    metadata = {"render_modes": ["rgb_array"], "render_fps": RENDER_FPS, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int,
        *,
        model,
        codec,
        context: ContextSource,
        context_frames: int = 9,
        horizon: int = 1000,
        sampler_steps: int = 2,
        render_mode: str | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        action_low: float = -1.0,
        action_high: float = 1.0,
        fast_decode: bool | None = None,
        fast_model: bool | None = None,
    ) -> None:
        """fast_decode: decode frames with bfloat16 convolutions (`FrameCodec.decode(bf16=True)`,
        frames within 2 grey levels of float32); None: where it is faster (a CPU with AMX and 8
        or more sub-envs, `bf16_decode_pays`).
        fast_model: run the world model in bfloat16 (`RolloutSession(model_bf16=True)`: the same
        prediction quality within 0.05 dB on held-out windows, not the same frames); None: where it is
        faster (a CPU with AMX and 16 or more sub-envs, `bf16_model_pays`)."""
        if horizon is None:
            raise ValueError("the vector dream needs a horizon (episode length in steps)")
        if num_envs < 1 or context_frames < 1 or horizon < 1:
            raise ValueError(f"num_envs, context_frames and horizon must be >= 1, got {num_envs}, {context_frames}, {horizon}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"the vector dream renders only 'rgb_array' (a row of frames), got {render_mode!r}")
        if isinstance(autoreset_mode, str) and autoreset_mode.upper() in AutoresetMode.__members__:
            autoreset_mode = AutoresetMode[autoreset_mode.upper()]  # "same_step" as well as "SameStep"
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        if self.autoreset_mode == AutoresetMode.DISABLED:
            raise ValueError("autoreset_mode must be NEXT_STEP or SAME_STEP")
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode}
        self.num_envs = num_envs
        self.context = context
        self.context_frames = context_frames
        self.horizon = horizon
        self.render_mode = render_mode
        device = next(model.parameters()).device
        fast_decode = bf16_decode_pays(device, num_envs) if fast_decode is None else fast_decode
        fast_model = bf16_model_pays(device, num_envs) if fast_model is None else fast_model
        self.session = RolloutSession(model, codec, batch=num_envs, sampler_steps=sampler_steps,
                                      decode_bf16=fast_decode, model_bf16=fast_model)
        self.single_observation_space = spaces.Box(0, 255, FRAME_SHAPE, np.uint8)
        self.single_action_space = action_space_for(model.cfg, action_low, action_high)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._rngs = [seeding.np_random()[0] for _ in range(num_envs)]
        self._frames = np.zeros((num_envs, *FRAME_SHAPE), np.uint8)
        self._t = np.zeros(num_envs, np.int64)
        self._ended = np.zeros(num_envs, bool)  # NEXT_STEP: restart these on the next step
        self._started = False
        self._owned_context = False  # closed with the env (set by make_dream_vector_env when it made it)

    @classmethod
    def from_checkpoint(cls, num_envs: int, checkpoint, codec=None, **kwargs) -> DreamVectorEnv:
        model, codec_model = load_dream_model(checkpoint, codec)
        return cls(num_envs, model=model, codec=codec_model, **kwargs)

    # -- helpers --------------------------------------------------------------------------------
    def _contexts(self, envs: list[int]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        clips = [self.context.sample(self._rngs[i], self.context_frames) for i in envs]
        seeds = [int(self._rngs[i].integers(SEED_BOUND)) for i in envs]  # same order as DreamEnv.reset
        for frames, actions in clips:
            if len(frames) < self.context_frames or len(actions) < self.context_frames - 1:
                raise ValueError(f"context clip has {len(frames)} frames, {self.context_frames} are required")
        return np.stack([c[0] for c in clips]), np.stack([c[1] for c in clips]), seeds

    def _restart(self, envs: list[int]) -> None:
        frames, actions, seeds = self._contexts(envs)
        obs = self.session.reset_streams(envs, frames, actions, seeds=seeds)
        self._frames[envs] = obs.numpy()
        self._t[envs] = 0

    def _actions(self, actions) -> np.ndarray:
        a = np.asarray(actions)
        lead = (self.num_envs, *self.single_action_space.shape)
        if a.shape != lead:
            raise ValueError(f"actions must have shape {lead} (one per sub-env), got {a.shape}")
        return np.stack([check_action(self.single_action_space, x) for x in a])

    # -- API ------------------------------------------------------------------------------------
    def _seeds(self, seed) -> list[int]:
        """seed s -> [s, s + 1, ...]; a list or tuple -> one per sub-env; each a non-negative integer."""
        many = isinstance(seed, (list, tuple, np.ndarray))
        given = list(seed) if many else [seed]
        for s in given:
            if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) or s < 0:
                raise TypeError(f"seed must be a non-negative integer or a list of {self.num_envs} of them, got {seed!r}"
                                if not many else f"seeds must be non-negative integers, got {s!r} in {seed!r}")
        if not many:
            return [int(seed) + i for i in range(self.num_envs)]
        if len(given) != self.num_envs:
            raise ValueError(f"need {self.num_envs} seeds, got {len(given)}")
        return [int(s) for s in given]

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        """All sub-envs; seed s gives sub-env i the seed s + i (a list: one seed each)."""
        if self.closed:
            raise closed_error(type(self).__name__)
        check_reset_options(type(self).__name__, options)
        if seed is not None:
            self._rngs = [seeding.np_random(s)[0] for s in self._seeds(seed)]
        frames, actions, seeds = self._contexts(list(range(self.num_envs)))
        self._frames[:] = self.session.reset(frames, actions, seeds=seeds).numpy()
        self._t[:] = 0
        self._ended[:] = False
        self._started = True
        return self._frames.copy(), {}

    def step(self, actions):
        if self.closed:
            raise closed_error(type(self).__name__)
        a = self._actions(actions)  # validate before anything changes
        if not self._started:
            raise RuntimeError("call reset() before step()")
        # One model call for every stream. Streams restarting this step (NEXT_STEP) step too, and
        # their state is then overwritten by the fresh context, so they end exactly where a
        # freshly reset DreamEnv starts.
        out = self.session.step(a)
        obs = out.frames.numpy().copy()
        rewards = out.rewards.numpy().astype(np.float64)
        terminated = out.terminated.numpy().copy()
        self._t += 1
        truncated = (self._t >= self.horizon) & ~terminated
        infos: dict = {}

        restarting = np.flatnonzero(self._ended).tolist()
        if restarting:  # NEXT_STEP: these sub-envs ended last step; this step is their reset
            self._restart(restarting)
            obs[restarting] = self._frames[restarting]
            rewards[restarting] = 0.0
            terminated[restarting] = truncated[restarting] = False
        ended = terminated | truncated
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            self._ended = ended
            self._frames[:] = obs
        elif ended.any():  # SAME_STEP: restart now, hand the last frame over in info
            done = np.flatnonzero(ended).tolist()
            final = np.empty(self.num_envs, dtype=object)  # one (64, 64, 3) uint8 frame or None per sub-env
            for i in done:
                final[i] = obs[i].copy()
            infos["final_obs"] = final
            infos["_final_obs"] = ended.copy()
            infos["final_info"] = {"step": self._t.copy(), "_step": ended.copy()}
            infos["_final_info"] = ended.copy()
            self._frames[:] = obs
            self._restart(done)
            obs = self._frames.copy()
        else:
            self._frames[:] = obs
        infos["step"], infos["_step"] = self._t.copy(), np.ones(self.num_envs, bool)
        return obs, rewards, terminated, truncated, infos

    def render(self):
        """The sub-envs' current frames side by side, (64, 64 num_envs, 3) uint8."""
        if self.render_mode != "rgb_array":
            return None
        return np.concatenate(list(self._frames), axis=1)

    def close_extras(self, **kwargs) -> None:
        if self._owned_context and hasattr(self.context, "close"):
            self.context.close()
            self._owned_context = False


def make_dream_vector_env(
    num_envs: int,
    checkpoint=None,
    codec=None,
    *,
    dataset=None,
    maze_size: int = 9,
    context: ContextSource | None = None,
    context_frames: int = 9,
    horizon: int | None = None,
    max_episode_steps: int | None = None,
    **kwargs,
) -> DreamVectorEnv:
    """Vector entry point of the registered dream ids (arguments as `make_dream_env`).

    `gymnasium.make_vec` passes the id's `max_episode_steps` (or the caller's); it becomes the
    horizon unless `horizon` is given. Neither: 1000 steps."""
    checkpoint = resolve_dream_checkpoint(checkpoint, maze_size)  # the bundled model, or a clear error
    if horizon is None:
        horizon = max_episode_steps if max_episode_steps is not None else 1000
    model, codec_model = load_dream_model(checkpoint, codec)
    venv = DreamVectorEnv(num_envs, model=model, codec=codec_model, context_frames=context_frames, horizon=horizon,
                          context=make_context(context, dataset, maze_size, context_frames), **kwargs)
    venv._owned_context = context is None
    return venv
