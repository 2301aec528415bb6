"""`worldsim bench rollout`: what one dreamed frame costs, where it goes, and whether it stays flat.

Five measurements, in one run, on one machine, of the bundled model by default (the model users
get; `preset=` a preset name measures that preset with random weights instead):

  * Where a dreamed frame's time goes (`RolloutSession.step`, batch sizes as for the dream env):
    the sampler's denoiser calls, the committing call, the codec's decode, per frame; frames/s,
    and the real Memory Maze env's step through our adapter in the same run, with the ratio of
    the two (the figure that survives a busy machine).

  * Latency per frame at horizons (default 64, 512, 4096 frames) and the streaming state's bytes,
    for LSSVWM and the causal-attention baseline with its KV cache, side by side. Goal: LSSVWM's
    median latency at 4096 / at 64 <= 1.05, with identical state bytes at every horizon; the
    causal baseline's KV cache (and latency) grow with the horizon.
  * Dream env frames/s vs batch size (`DreamVectorEnv`, one model call for all sub-envs) next to
    the real Memory Maze env's steps/s on the same CPU. Goal: batched dream >= real.
  * A long rollout (default 2000 steps; `--long-steps 100000` for the full check): resident memory
    sampled every `rss_every` steps stays flat, the state's bytes are the same at the end as at
    the start, and no latent / reward turns NaN. With one sampler call per frame and
    `--no-long-decode` (the decoder holds no state) a 100k-frame run takes 12-13 minutes on one
    thread of this project's (shared) CPU: 7-8 ms per frame for the tiny preset; decoding every
    frame adds ~6 ms per frame.
  * On a GPU (device auto picks it) the same tables give batched and single-stream frames/s.

Method:
  * preset "bundled": the shipped model and codec, dreaming from the bundle's real context clips;
    the baselines it is compared with (variants other than its own, e.g. causal_full) are its
    config turned into that variant with random weights. Any other preset: random weights.
    Cost does not depend on the weight values (every op's shapes depend only on the config and
    the horizon). In random models the zero-initialised adaLN gates are opened (small random
    values) so the streamed state actually feeds each frame, which matters for the NaN check, and
    the termination head is biased negative so random heads do not end dream episodes (a restart
    would be timed instead of a step).
  * Breakdown: after reset and one warm-up step, `breakdown_steps` steps are timed with the
    session's phase timings (`RolloutSession.step(timings=)`); per-frame figures are means over
    those steps (so the phases add up to the total), frames/s = batch / (seconds per step).
  * Latency at horizon h: the session is brought to h frames, then `timed_frames` real steps
    are timed one by one (sampler_steps denoiser calls that read the cache + the commit + the
    codec decode, `RolloutSession.step`); the median is reported. Getting to h: fixed-size
    variants stream commit-only steps (the real state at h). The causal-full baseline's KV cache
    is instead filled to h frames in one `FrameKVCache.append` per layer: streaming it there
    costs O(h^2) (about 8 minutes to 4096 frames for the tiny preset on 2 cores), and its step
    cost depends on how many frames are held, not on their values. `advance="stream"` streams
    every variant for real.
  * Dream frames/s: after reset and one warm-up step, `rounds` rounds of `dream_steps` vector
    steps are timed, each just after `real_round_steps` steps of the real env; frames/s = batch *
    steps / seconds over all rounds, dream/real the median of the rounds' ratios (the machine's
    speed drifts over minutes: a real env timed once at the start swung the ratio by 1.5x between
    runs). Context clips: the bundle's, else random frames (not timed).
  * Real env: our Gymnasium adapter (as `worldsim.bench.data.measure_adapter`), random actions;
    timed once at the start for the breakdown's ratios, and in every round.
  * Both also report frames per CPU-second of the process (`time.process_time`, which counts
    every thread, MuJoCo's renderer included): on a shared machine wall time also counts the
    other processes, CPU time much less so.
  * Memory: the process's resident set (/proc/self/statm) after freed heap is returned to the OS.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from worldsim.loading import BUNDLED
from worldsim.bench.train import malloc_trim, rss_bytes
from worldsim.bundled import load_bundled
from worldsim.codec.autoencoder import FrameCodec, bf16_decode_pays
from worldsim.codec.autoencoder import preset as codec_config
from worldsim.envs.dream_vector import DreamVectorEnv
from worldsim.envs.memory_maze import MemoryMazeEnv
from worldsim.model.config import make_config
from worldsim.model.world_model import WorldModel
from worldsim.rollout.context import ClipContext
from worldsim.rollout.session import MODEL_DTYPES, RolloutSession, model_in_bf16

# The termination head's bias for random models: logit ~ -10, far below the threshold 0.
NO_TERMINATION_BIAS = -10.0


DECODE_DTYPES = ("auto", "float32", "bfloat16")
OVERLAP_CHOICES = ("auto", "on", "off")


@dataclass
class RolloutBenchConfig:
    preset: str = "bundled"
    """"bundled": the shipped model and codec (what users get); or a world-model preset
    (worldsim.model.config.PRESETS: tiny, small, cpu on a CPU) with random weights."""
    codec: str = "small"
    """Codec preset for random-weight presets; its latent (16, 8, 8) is the presets' latent shape."""
    variants: tuple[str, ...] = ("lssvwm", "causal_full")
    """Variants timed side by side at each horizon."""
    horizons: tuple[int, ...] = (64, 512, 4096)
    """Frames already streamed when the timed window starts."""
    timed_frames: int = 16
    """Frames timed at each horizon (median reported)."""
    sampler_steps: int = 2
    """Denoiser calls per dreamed frame."""
    decode_dtype: str = "auto"
    """Frame decoding in the breakdown and the dream env: "auto" (bfloat16 where it is faster: a
    CPU with AMX at batch >= 8, as the dream env chooses), "float32" or "bfloat16"."""
    model_dtype: str = "auto"
    """The world model in the breakdown and the dream env: "auto" (bfloat16 where it is faster: a
    CPU with AMX at batch >= 16, as the dream env chooses), "float32" or "bfloat16"."""
    overlap_decode: str = "auto"
    """Decode each frame on a worker thread while the commit runs (`RolloutSession.overlap_decode`):
    "auto" (as sessions choose: from batch 8 where the torch threads leave a core free), "on" or "off"."""
    advance: str = "auto"
    """How a session gets to a horizon: "auto" (stream fixed-size variants, fill causal_full's
    KV cache) or "stream" (commit-only steps for every variant; O(h^2) for causal_full)."""
    batches: tuple[int, ...] = (1, 8, 64)
    """Dream vector env batch sizes (add 256 to see where the per-frame cost levels off)."""
    dream_steps: int = 8
    """Timed vector steps per batch size and round (after one warm-up step)."""
    rounds: int = 3
    """Rounds at each dream env batch size: each times `real_round_steps` steps of the real env,
    then `dream_steps` dream env steps. dream/real is taken round by round and its median
    reported with the range: the machine's speed drifts over minutes, and a round's two
    measurements see the same machine."""
    real_round_steps: int = 100
    """Real env steps timed in each round (with `real_env`)."""
    breakdown_steps: int = 16
    """Timed `RolloutSession.step` calls per batch size in the per-frame breakdown."""
    context_frames: int = 9
    """Context clip length for the dream env (the tiny/small attention window)."""
    real_env: bool = True
    """Measure the real Memory Maze env (MuJoCo) for the dream/real ratio."""
    maze_size: int = 9
    """Memory Maze size for the real env."""
    real_steps: int = 300
    """Timed real env steps."""
    long_steps: int = 2000
    """Frames of the long rollout (100000 for the full check)."""
    long_sampler_steps: int = 1
    """Denoiser calls per frame in the long rollout: the state only advances at the commit, so
    one call keeps a 100k-step run affordable without changing what is measured."""
    long_decode: bool = True
    """Decode every frame of the long rollout to pixels (the dream env's full step). The decoder
    holds no state, so False measures the same memory and NaN behaviour in about half the time."""
    rss_every: int = 500
    """Resident-set sample interval in the long rollout (steps)."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu" or "cuda"."""
    threads: int | None = None
    """torch CPU threads (None: torch's default). Use 1 for stable numbers on a shared machine."""
    seed: int = 0
    """Seeds the random weights, the actions, the sampler noise and the real env."""


# ------------------------------------------------------------------------------ helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def in_use_rss_bytes() -> int:
    """Resident set after returning freed heap to the OS (so it counts what is in use)."""
    malloc_trim()
    return rss_bytes()


def _random_model(cfg, seed: int):
    """A WorldModel of config `cfg` with random weights, opened up as the module doc says."""
    torch.manual_seed(seed)
    model = WorldModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:  # adaLN-Zero gates and the final layer start at zero
                p.normal_(0, 0.05)
        model.net.heads.mlp[-1].bias[1] = NO_TERMINATION_BIAS
    return model


def random_parts(preset: str, variant: str, codec_preset: str, device: torch.device, seed: int = 0):
    """(world model, codec) with random weights, shaped as the presets say (module doc)."""
    torch.manual_seed(seed)
    codec = FrameCodec(codec_config(codec_preset)).eval()
    c, h, w = codec.config.latent_shape
    model = _random_model(make_config(preset, variant, latent_channels=c, latent_grid=(h, w)), seed)
    return model.to(device), codec.to(device)


@dataclass
class Parts:
    """What one variant is measured with: model, codec, and real context clips (None: random frames)."""

    model: Any
    codec: Any
    clips: Any = None

    def context(self, rng: np.random.Generator, batch: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
        """Context frames uint8 (batch, frames, 64, 64, 3) and actions (batch, frames - 1): the end of
        the first bundled clip for every stream, else random ones (cost does not depend on them)."""
        if self.clips is not None and self.clips.clip_frames >= frames:
            f, a = self.clips.frames[0, -frames:], self.clips.actions[0, self.clips.clip_frames - frames:]
            return np.repeat(f[None], batch, axis=0), np.repeat(a[None], batch, axis=0)
        return (rng.integers(0, 256, (batch, frames, 64, 64, 3), dtype=np.uint8),
                rng.integers(0, self.model.cfg.n_actions, (batch, frames - 1)))


def load_parts(cfg: RolloutBenchConfig, variant: str | None, device: torch.device) -> Parts:
    """The bundled model for its own variant (or variant None), its config as `variant` with random
    weights for the baselines; random weights of `cfg.preset` otherwise (None: lssvwm)."""
    if cfg.preset != BUNDLED:
        return Parts(*random_parts(cfg.preset, variant or "lssvwm", cfg.codec, device, cfg.seed))

    bundle = load_bundled(device=device)
    if variant in (None, bundle.model.cfg.variant):
        return Parts(bundle.model, bundle.codec, bundle.clips)
    return Parts(_random_model(make_config(bundle.model.cfg, variant), cfg.seed).to(device), bundle.codec, bundle.clips)


# ------------------------------------------------------------------------------ latency vs horizon
def _fill_kv(session, frames: int) -> None:
    """Append `frames` frames of random keys/values to every layer's growing KV cache."""
    cache = session.cache
    for layer in cache.layers:
        if layer.ssm is not None or layer.kv is None or layer.kv.window is not None:
            raise ValueError("filling only applies to a pure growing-KV (causal_full) cache")
        B, H, _, N, D = layer.kv.keys.shape
        layer.kv.append(torch.randn(B, H, frames, N, D, device=layer.kv.keys.device, dtype=layer.kv.keys.dtype),
                        torch.randn(B, H, frames, N, D, device=layer.kv.keys.device, dtype=layer.kv.keys.dtype))
    cache.frames_seen += frames


@torch.no_grad()
def _stream_commits(session, frames: int, rng: np.random.Generator) -> None:
    """Commit-only steps: the state at the horizon exactly as a rollout leaves it (no sampler)."""
    shape = (session.batch, *session.latents.shape[1:])
    for _ in range(frames):
        session.commit(rng.integers(0, session.model.cfg.n_actions, session.batch), torch.randn(shape))


def advance(session, frames: int, mode: str, rng: np.random.Generator) -> str:
    """Bring the session `frames` frames further; returns how ("stream" or "fill")."""
    if frames <= 0:
        return "none"
    growing = session.model.cfg.attn_window is None and session.model.cfg.has_attention
    how = "fill" if mode == "auto" and growing and not session.model.cfg.has_ssm else "stream"
    if how == "fill":
        _fill_kv(session, frames)
    else:
        _stream_commits(session, frames, rng)
    return how


def measure_horizons(cfg: RolloutBenchConfig, parts: Parts, device: torch.device) -> list[dict[str, Any]]:
    """Per-frame latency and state bytes of one variant at each horizon (ascending)."""
    model, variant = parts.model, parts.model.cfg.variant
    rng = np.random.default_rng(cfg.seed)
    session = RolloutSession(model, parts.codec, batch=1, sampler_steps=cfg.sampler_steps, seed=cfg.seed)
    session.reset(*parts.context(rng, 1, 1))
    session.step(rng.integers(0, model.cfg.n_actions, 1))  # warm-up (first-call allocations)
    rows = []
    for h in sorted(cfg.horizons):
        how = advance(session, h - session.frames_seen, cfg.advance, rng)
        start_frame = session.frames_seen  # = h unless horizons are closer than timed_frames
        state = session.state_nbytes()
        times = []
        for _ in range(cfg.timed_frames):
            a = rng.integers(0, model.cfg.n_actions, 1)
            _sync(device)
            start = time.perf_counter()
            session.step(a)
            _sync(device)
            times.append(time.perf_counter() - start)
        rows.append({
            "variant": variant, "horizon": h, "frames_seen": start_frame, "advance": how, "state_bytes": state,
            "ms_median": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times),
            "ms_mean": 1e3 * statistics.fmean(times),
        })
    return rows


def overlap_setting(cfg: RolloutBenchConfig) -> bool | None:
    return {"auto": None, "on": True, "off": False}[cfg.overlap_decode]


def decode_in_bf16(cfg: RolloutBenchConfig, batch: int, device: torch.device) -> bool:
    if cfg.decode_dtype == "auto":
        return bf16_decode_pays(device, batch)
    return cfg.decode_dtype == "bfloat16"


# ------------------------------------------------------------------------------ dream fps vs batch
def measure_dream_fps(cfg: RolloutBenchConfig, batch: int, parts: Parts) -> dict[str, Any]:
    """The dream env's frames/s at `batch` in `cfg.rounds` rounds, each after a stretch of the
    real env (with `cfg.real_env`): totals over the rounds, and dream/real per round."""
    rng = np.random.default_rng(cfg.seed)
    frames, actions = parts.context(rng, 1, cfg.context_frames)
    device = next(parts.model.parameters()).device
    env = DreamVectorEnv(batch, model=parts.model, codec=parts.codec, context=ClipContext([frames[0]], [actions[0]]),
                         context_frames=cfg.context_frames, horizon=10**9, sampler_steps=cfg.sampler_steps,
                         fast_decode=decode_in_bf16(cfg, batch, device),
                         fast_model=model_in_bf16(cfg.model_dtype, device, batch))
    env.session.overlap_decode = overlap_setting(cfg)
    env.reset(seed=cfg.seed)
    env.step(env.action_space.sample())  # warm-up
    real = RealEnvTimer(cfg.maze_size, cfg.seed) if cfg.real_env else None
    rounds = []
    try:
        for _ in range(cfg.rounds):
            real_round = real.time(cfg.real_round_steps) if real else None
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(cfg.dream_steps):
                env.step(env.action_space.sample())
            elapsed = time.perf_counter() - start  # frames come back as numpy: the device is synchronised
            cpu = time.process_time() - cpu_start
            frames = batch * cfg.dream_steps
            rounds.append({"seconds": elapsed, "cpu_seconds": cpu, "real": real_round,
                           "vs_real": _ratio(frames / elapsed, real_round and real_round["steps_per_s"]),
                           "vs_real_cpu": _ratio(frames / cpu, real_round and real_round["steps_per_cpu_s"])})
    finally:
        env.close()
        if real:
            real.close()
    steps = cfg.dream_steps * cfg.rounds
    elapsed, cpu = sum(r["seconds"] for r in rounds), sum(r["cpu_seconds"] for r in rounds)
    return {"batch": batch, "steps": steps, "seconds": elapsed, "cpu_seconds": cpu, "rounds": rounds,
            "decode_bf16": env.session.decode_bf16, "model_bf16": env.session.model_bf16, "overlap_decode": env.session.overlap_decode,
            "frames_per_s": batch * steps / elapsed, "frames_per_cpu_s": batch * steps / cpu,
            "ms_per_step": 1e3 * elapsed / steps}


@torch.no_grad()
def measure_breakdown(cfg: RolloutBenchConfig, batch: int, parts: Parts) -> dict[str, Any]:
    """Where a dreamed frame's time goes at `batch` streams: ms per step in the sampler's denoiser
    calls, the commit and the decode (`RolloutSession.step(timings=)`), means over the timed steps."""
    model = parts.model
    rng = np.random.default_rng(cfg.seed)
    device = next(model.parameters()).device
    bf16, model_bf16 = decode_in_bf16(cfg, batch, device), model_in_bf16(cfg.model_dtype, device, batch)
    session = RolloutSession(model, parts.codec, batch=batch, sampler_steps=cfg.sampler_steps, seed=cfg.seed,
                             decode_bf16=bf16, overlap_decode=overlap_setting(cfg), model_bf16=model_bf16)
    session.reset(*parts.context(rng, batch, cfg.context_frames))
    actions = rng.integers(0, model.cfg.n_actions, (cfg.breakdown_steps + 1, batch))
    session.step(actions[0])  # warm-up
    timings: dict[str, float] = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    for a in actions[1:]:
        session.step(a, timings=timings)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    n = cfg.breakdown_steps
    row = {"batch": batch, "steps": n, "seconds": elapsed, "cpu_seconds": cpu, "decode_bf16": bf16, "model_bf16": model_bf16,
           "overlap_decode": session.overlap_decode,
           **{f"{phase}_ms": 1e3 * timings[phase] / n for phase in ("denoise", "commit", "decode")}}
    row["total_ms"] = 1e3 * elapsed / n
    row["other_ms"] = row["total_ms"] - row["denoise_ms"] - row["commit_ms"] - row["decode_ms"]  # actions in, results out
    row["frames_per_s"], row["frames_per_cpu_s"] = batch * n / elapsed, batch * n / cpu
    return row


class RealEnvTimer:
    """The real Memory Maze through our Gymnasium adapter, random actions, timed in stretches
    (creation and the first reset not timed; the loop of `worldsim.bench.data.measure_adapter`)."""

    def __init__(self, maze_size: int, seed: int) -> None:
        self.env = MemoryMazeEnv(size=maze_size)
        self.env.reset(seed=seed)
        self.rng = np.random.default_rng(seed)

    def time(self, steps: int) -> dict[str, Any]:
        """Steps/s of the next `steps` steps, in wall and CPU time."""
        actions = self.rng.integers(0, self.env.action_space.n, size=steps)
        start, cpu_start = time.perf_counter(), time.process_time()
        for a in actions:
            _, _, terminated, truncated, _ = self.env.step(int(a))
            if terminated or truncated:
                self.env.reset()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        return {"steps": steps, "seconds": elapsed, "cpu_seconds": cpu, "steps_per_s": steps / elapsed,
                "steps_per_cpu_s": steps / cpu, "ms_per_step": 1e3 * elapsed / steps}

    def close(self) -> None:
        self.env.close()


def measure_real_env(maze_size: int, steps: int, seed: int) -> dict[str, Any]:
    """Real Memory Maze steps/s (see `RealEnvTimer`) over `steps` steps."""
    real = RealEnvTimer(maze_size, seed)
    try:
        return real.time(steps)
    finally:
        real.close()


# ------------------------------------------------------------------------------ long rollout
@torch.no_grad()
def measure_long_rollout(cfg: RolloutBenchConfig, parts: Parts, progress: bool = False) -> dict[str, Any]:
    """Stream `long_steps` real frames; RSS, state bytes and ms/frame sampled every `rss_every`."""
    model = parts.model
    rng = np.random.default_rng(cfg.seed)
    session = RolloutSession(model, parts.codec, batch=1, sampler_steps=cfg.long_sampler_steps, seed=cfg.seed)
    session.reset(*parts.context(rng, 1, cfg.context_frames))
    state_start, rss_start = session.state_nbytes(), in_use_rss_bytes()
    actions = rng.integers(0, model.cfg.n_actions, (cfg.long_steps, 1))
    every = max(1, min(cfg.rss_every, cfg.long_steps))
    samples, nan_steps, first_nan = [], 0, None
    start = segment_start = time.perf_counter()
    for t in range(cfg.long_steps):
        out = session.step(actions[t], decode=cfg.long_decode)
        finite = bool(torch.isfinite(out.latents).all()) and bool(torch.isfinite(out.rewards).all()) \
            and bool(torch.isfinite(out.termination_logits).all())
        if not finite:
            nan_steps += 1
            first_nan = t if first_nan is None else first_nan
        if (t + 1) % every == 0 or t + 1 == cfg.long_steps:
            now = time.perf_counter()
            done_in_segment = (t + 1) - (samples[-1]["step"] if samples else 0)
            samples.append({"step": t + 1, "rss_bytes": in_use_rss_bytes(), "state_bytes": session.state_nbytes(),
                            "ms_per_frame": 1e3 * (now - segment_start) / done_in_segment})
            segment_start = time.perf_counter()  # RSS sampling is not part of the frame time
            if progress:
                left = (now - start) / (t + 1) * (cfg.long_steps - t - 1)
                print(f"  long rollout: {t + 1}/{cfg.long_steps} steps, RSS {_mib(samples[-1]['rss_bytes'])}, "
                      f"{samples[-1]['ms_per_frame']:.2f} ms/frame, NaN steps {nan_steps}, ~{left / 60:.1f} min left",
                      flush=True)
    elapsed = time.perf_counter() - start
    rss = [s["rss_bytes"] for s in samples]
    return {
        "steps": cfg.long_steps, "seconds": elapsed, "frames_per_s": cfg.long_steps / elapsed,
        "sampler_steps": cfg.long_sampler_steps, "decode": cfg.long_decode,
        "samples": samples, "rss_start": rss_start, "rss_first": rss[0], "rss_last": rss[-1],
        "rss_max_growth": max(rss) - rss[0],  # against the first sample, taken after `every` steps
        "state_bytes_start": state_start,
        "state_bytes_first": samples[0]["state_bytes"], "state_bytes_last": samples[-1]["state_bytes"],
        "ms_per_frame_first": samples[0]["ms_per_frame"], "ms_per_frame_last": samples[-1]["ms_per_frame"],
        "nan_steps": nan_steps, "first_nan_step": first_nan,
    }


# ------------------------------------------------------------------------------ the bench
def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _median(values: list[float | None]) -> float | None:
    return None if None in values else statistics.median(values)


def _span(values: list[float | None]) -> tuple[float, float] | None:
    return None if None in values else (min(values), max(values))


def run(cfg: RolloutBenchConfig = RolloutBenchConfig(), progress: bool = False) -> dict[str, Any]:
    if cfg.advance not in ("auto", "stream"):
        raise ValueError(f"advance must be 'auto' or 'stream', got {cfg.advance!r}")
    if cfg.overlap_decode not in OVERLAP_CHOICES:
        raise ValueError(f"overlap_decode must be one of {OVERLAP_CHOICES}, got {cfg.overlap_decode!r}")
    if cfg.decode_dtype not in DECODE_DTYPES:
        raise ValueError(f"decode_dtype must be one of {DECODE_DTYPES}, got {cfg.decode_dtype!r}")
    if cfg.model_dtype not in MODEL_DTYPES:
        raise ValueError(f"model_dtype must be one of {MODEL_DTYPES}, got {cfg.model_dtype!r}")
    if cfg.rounds < 1 or (cfg.real_env and cfg.real_round_steps < 1):
        raise ValueError("rounds and real_round_steps must be >= 1")
    if min(cfg.horizons) < 2 or min(cfg.timed_frames, min(cfg.batches), cfg.long_steps, cfg.breakdown_steps) < 1:
        raise ValueError("horizons must be >= 2 frames; timed_frames, batches, breakdown_steps and long_steps >= 1")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    say = print if progress else (lambda *a, **k: None)
    results: dict[str, Any] = {
        "config": asdict(cfg), "device": str(device), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    main = load_parts(cfg, None, device)  # the bundle (or the preset's lssvwm): every figure but the baselines'
    results["model"] = {"variant": main.model.cfg.variant, "parameters": main.model.num_parameters()}
    results["real"] = None
    if cfg.real_env:
        say("real Memory Maze steps/s", flush=True)
        results["real"] = measure_real_env(cfg.maze_size, cfg.real_steps, cfg.seed)
    real = results["real"]["steps_per_s"] if results["real"] else None
    real_cpu = results["real"]["steps_per_cpu_s"] if results["real"] else None
    results["breakdown"] = []
    for b in cfg.batches:
        say(f"per-frame breakdown: batch {b}", flush=True)
        row = measure_breakdown(cfg, b, main)
        row["vs_real"], row["vs_real_cpu"] = _ratio(row["frames_per_s"], real), _ratio(row["frames_per_cpu_s"], real_cpu)
        results["breakdown"].append(row)
    lo, hi = min(cfg.horizons), max(cfg.horizons)
    results["horizons"], results["latency_ratio"], results["state_constant"] = [], {}, {}
    for variant in cfg.variants:
        say(f"latency vs horizon: {variant}", flush=True)
        parts = main if variant == main.model.cfg.variant else load_parts(cfg, variant, device)
        rows = measure_horizons(cfg, parts, device)
        results["horizons"] += rows
        by_h = {r["horizon"]: r for r in rows}
        results["latency_ratio"][variant] = _ratio(by_h[hi]["ms_median"], by_h[lo]["ms_median"])
        results["state_constant"][variant] = len({r["state_bytes"] for r in rows}) == 1
    results["dream"] = []
    for b in cfg.batches:
        say(f"dream env frames/s: batch {b}", flush=True)
        results["dream"].append(measure_dream_fps(cfg, b, main))
    for key, field in (("dream_vs_real", "vs_real"), ("dream_vs_real_cpu", "vs_real_cpu")):
        results[key] = {str(d["batch"]): _median([r[field] for r in d["rounds"]]) for d in results["dream"]}
        results[key + "_range"] = {str(d["batch"]): _span([r[field] for r in d["rounds"]]) for d in results["dream"]}
    say(f"long rollout: {cfg.long_steps} steps", flush=True)
    results["long"] = measure_long_rollout(cfg, main, progress)
    return results


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def format_table(results: dict[str, Any]) -> str:
    cfg = results["config"]
    where = results["gpu"] or f"{results['device']} ({results['threads']} threads of {results['cpu_count']} cores)"
    params = f"{results['model']['parameters'] / 1e6:.1f}M parameters"
    what = (f"the bundled model ({results['model']['variant']}, {params}) and its codec" if cfg["preset"] == BUNDLED
            else f"preset {cfg['preset']} ({params}, random weights), codec {cfg['codec']}")
    real = results["real"]
    lines = [f"Rollout bench, {what}, on {where}",
             f"Per-frame breakdown (RolloutSession.step: {cfg['sampler_steps']} denoiser calls, commit, decode; "
             f"ms per step, mean of {cfg['breakdown_steps']} steps; dream/real per CPU-second in brackets)",
             f"  {'batch':>8} {'denoise':>8} {'commit':>8} {'decode':>8} {'other':>7} {'total':>8} {'frames/s':>9}  dream/real"
             "  (# world model in bfloat16; * decoded in bfloat16; + decoded on a second thread during the "
             "commit, the wait shown)"]
    for r in results["breakdown"]:
        marks = ("*" if r["decode_bf16"] else "") + ("+" if r.get("overlap_decode") else "")
        model_mark = "#" if r.get("model_bf16") else " "
        lines.append(f"  {r['batch']:>8} {r['denoise_ms']:>7.2f}{model_mark} {r['commit_ms']:>7.2f}{model_mark} "
                     f"{r['decode_ms']:>8.2f}{marks:<2}"
                     f"{r['other_ms']:>6.2f} {r['total_ms']:>8.2f} {r['frames_per_s']:>9.1f}  "
                     f"{_fmt(r['vs_real'], '.2f', 'x')} ({_fmt(r['vs_real_cpu'], '.2f', 'x')})")
    if real:
        lines.append(f"  {'real env':>8} {'':>8} {'':>8} {'':>8} {'':>7} {real['ms_per_step']:>8.2f} "
                     f"{real['steps_per_s']:>9.1f}  (Memory Maze {cfg['maze_size']}x{cfg['maze_size']}, env.step "
                     "through the Gymnasium adapter)")
    lines += [f"Per-frame latency ({cfg['sampler_steps']} sampler steps + commit + decode; median of "
              f"{cfg['timed_frames']} frames after the horizon)",
              f"  {'variant':<12} {'horizon':>8} {'ms/frame':>9} {'min ms':>8} {'state':>12}  reached by"]
    for r in results["horizons"]:
        lines.append(f"  {r['variant']:<12} {r['horizon']:>8} {r['ms_median']:>9.2f} {r['ms_min']:>8.2f} "
                     f"{_mib(r['state_bytes']):>12}  {r['advance']}")
    lo, hi = min(cfg["horizons"]), max(cfg["horizons"])
    for variant, ratio in results["latency_ratio"].items():
        same = "identical" if results["state_constant"][variant] else "growing"
        goal = "  (goal <= 1.05)" if variant == "lssvwm" else ""
        lines.append(f"  {variant}: latency {hi}/{lo} = {_fmt(ratio, '.3f')}{goal}; state bytes {same}")
    lines.append(f"Dream env (DreamVectorEnv, {results['model']['variant']}) frames/s vs batch, {cfg['sampler_steps']} sampler steps "
                 f"(wall clock; per CPU-second in brackets); dream/real: the median of {cfg['rounds']} rounds, each "
                 "against the real env timed just before it (per CPU-second in brackets, then its range)")
    for d in results["dream"]:
        key = str(d["batch"])
        ratio, ratio_cpu = results["dream_vs_real"][key], results["dream_vs_real_cpu"][key]
        span = results["dream_vs_real_cpu_range"][key]
        spread = f", {span[0]:.2f}-{span[1]:.2f}x" if span else ""
        lines.append(f"  batch {d['batch']:>4}: {d['frames_per_s']:>9.1f} frames/s ({d['frames_per_cpu_s']:.1f}; "
                     f"{d['ms_per_step']:.1f} ms/step)   dream/real {_fmt(ratio, '.2f', 'x')} "
                     f"({_fmt(ratio_cpu, '.2f', 'x')}{spread}){'  model in bfloat16' if d.get('model_bf16') else ''}"
                     f"{'  decoded in bfloat16' if d['decode_bf16'] else ''}"
                     f"{'  decoded beside the commit' if d.get('overlap_decode') else ''}")
    if real:
        in_rounds = [r["real"]["steps_per_s"] for d in results["dream"] for r in d["rounds"]]
        lines.append(f"  real Memory Maze {cfg['maze_size']}x{cfg['maze_size']} (Gymnasium adapter): "
                     f"{real['steps_per_s']:.1f} steps/s ({real['steps_per_cpu_s']:.1f}) at the start, "
                     f"{min(in_rounds):.1f}-{max(in_rounds):.1f} in the rounds  (goal: batched dream >= real)")
    else:
        lines.append("  real Memory Maze: not measured")
    long = results["long"]
    decoded = "decoded" if long["decode"] else "not decoded"
    lines += [
        f"Long rollout: {long['steps']} frames ({long['sampler_steps']} sampler steps per frame, {decoded}), "
        f"{long['seconds']:.1f} s, {long['frames_per_s']:.1f} frames/s",
        f"  RSS after reset {_mib(long['rss_start'])}, first sample {_mib(long['rss_first'])}, last "
        f"{_mib(long['rss_last'])}, max growth {_mib(long['rss_max_growth'])}",
        f"  state {_mib(long['state_bytes_start'])} after reset -> {_mib(long['state_bytes_last'])} at the end "
        f"({'identical' if long['state_bytes_start'] == long['state_bytes_last'] else 'CHANGED'})",
        f"  ms/frame first segment {long['ms_per_frame_first']:.2f}, last {long['ms_per_frame_last']:.2f}; "
        f"NaN steps: {long['nan_steps']}",
    ]
    return "\n".join(lines)
