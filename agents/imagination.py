"""Train Stable-Baselines3 agents in imagination (a world model's dream) and score them in the real
Memory Maze, after the DIAMOND / DreamerV3 recipe "learn in the model, test in the world".

    from worldsim.agents.imagination import AgentTrainConfig, train_agent, compare_with_random

    result = train_agent(AgentTrainConfig(run_dir="runs/ppo-dream", world="dream", steps=5000))
    print(format_comparison(compare_with_random("runs/ppo-dream", episodes=5, max_steps=200)))

`world="dream"` trains on `num_envs` streams of one batched dream (`DreamSB3VecEnv`, one model
call per step) of a world-model checkpoint, the bundled model by default; `world="real"` trains
on as many real Memory Mazes (SB3 `DummyVecEnv`) for the same number of env steps, so a
dream-trained agent can be compared with a real-trained one. Training episodes are `horizon`
steps long in both worlds. PPO (`CnnPolicy`) by default; A2C and DQN through the same code.

Every `eval_every` env steps the policy plays `eval_episodes` episodes of at most
`eval_max_steps` steps in the REAL maze, episode i always on maze seed `eval_seed + i`; the mean
and std of the returns go to TensorBoard (`eval/`) and to the checkpoint's eval history, beside a
uniformly random policy on the same seeds (`worldsim.agents.agent_eval`, re-exported here).
Checkpoints are `worldsim.agents.agent_checkpoint` folders (safetensors + JSON, never pickles).

Resume (`train_agent(cfg, resume=True)`) restores the policy weights, the optimizer's moments,
num_timesteps, the eval history and the TensorBoard run, and trains until `steps`. It is not
bit-exact: the envs restart from fresh episodes (seeded with seed + num_timesteps), DQN's replay
buffer restarts empty and RNG streams are not restored.
"""

from __future__ import annotations

import importlib.util
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor

from worldsim.agents.agent_checkpoint import (
    check_spaces, latest_agent, load_optimizer_state, load_policy_weights, read_agent_meta, save_agent, space_summary,
)
# Scoring lives in agent_eval; its entry points are re-exported so one import serves both jobs.
from worldsim.agents.agent_eval import (
    ALGORITHMS, Agent, RealMazeEvaluator, algorithm_class, compare_with_random, evaluate_agent, evaluate_random,
    format_comparison, load_agent, maze_env_id, maze_size, real_spaces,
)
from worldsim.bundled import WEIGHTS_FILE, is_bundle, read_manifest
from worldsim.envs.dream import action_space_for
from worldsim.envs.sb3_vec import DreamSB3VecEnv
from worldsim.loading import load_dream_model, resolve_dream_checkpoint
from worldsim.model.config import ModelConfig
from worldsim.rollout.context import ClipContext, MinariContext
from worldsim.train.checkpoint import EMA_FILE, read_sidecar, resolve_checkpoint
from worldsim.utils.atomic import sha256_file
from worldsim.utils.checkpoint_folders import TENSORBOARD_DIR

__all__ = [
    "AgentTrainConfig", "train_agent", "default_hyperparameters", "collect_context_pool", "world_model_identity",
    "Agent", "RealMazeEvaluator", "load_agent", "evaluate_agent", "evaluate_random", "compare_with_random",
    "format_comparison", "ALGORITHMS", "WORLDS",
]
WORLDS = ("dream", "real")


# ------------------------------------------------------------------------------ config
def default_hyperparameters(algo: str, steps: int, num_envs: int, given: dict[str, Any]) -> dict[str, Any]:
    """SB3-zoo Atari settings (the closest published match for 64x64 pixels and 6 actions), scaled
    down where SB3's defaults assume millions of steps; `given` overrides any of them."""
    if algo == "ppo":
        n_steps = int(given.get("n_steps", 128))
        # Four minibatches per epoch, as the zoo's 8 envs x 128 steps / 256; divides exactly.
        defaults = {"n_steps": n_steps, "batch_size": max(1, n_steps * num_envs // 4), "n_epochs": 4,
                    "learning_rate": 2.5e-4, "clip_range": 0.1, "ent_coef": 0.01, "vf_coef": 0.5}
    elif algo == "a2c":
        defaults = {"ent_coef": 0.01, "vf_coef": 0.25}
    else:  # dqn: SB3's 1M-frame replay buffer of 64x64x3 pairs would take 24 GB
        defaults = {"buffer_size": max(1, min(steps, 20_000)), "learning_starts": min(1_000, steps // 10),
                    "learning_rate": 1e-4, "batch_size": 32, "train_freq": 4, "target_update_interval": 1_000,
                    "exploration_fraction": 0.1, "exploration_final_eps": 0.01}
    return {**defaults, **given}


@dataclass
class AgentTrainConfig:
    """What `train_agent` trains, where and how it is scored. JSON-able: it is stored in agent.json."""

    run_dir: str
    """Checkpoints, latest.json and TensorBoard logs go here."""
    world: str = "dream"
    """"dream": the world model's imagination; "real": the real Memory Maze (same steps, for comparison)."""
    env_id: str = "worldsim/MemoryMaze-9x9-v0"
    """The real maze: trained in (world="real"), evaluated in, and its size picks the dream's maze size."""
    checkpoint: str | None = None
    """World model: a `worldsim train` run, checkpoint or bundle folder. None or "bundled": the bundled model."""
    codec: str | None = None
    """Codec checkpoint (default: the one the world model records)."""
    dataset: str | None = None
    """Minari dataset (id or path) the dream's context clips come from; default: a pool of real walks."""
    context_mazes: int = 8
    """Dream without a dataset: real mazes randomly walked once at the start; each dreamed episode
    starts from a clip of these walks (a live maze reset costs ~1.5 s, too slow for every episode)."""
    context_walk: int = 100
    """Steps of each of those random walks."""
    algo: str = "ppo"
    """ppo, a2c or dqn."""
    policy: str = "CnnPolicy"
    """An SB3 policy alias of the algorithm (CnnPolicy, MlpPolicy)."""
    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    """JSON-able policy arguments (e.g. {"net_arch": [64]}); stored to rebuild the policy."""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    """Algorithm arguments over `default_hyperparameters` (e.g. {"n_steps": 64})."""
    steps: int = 10_000
    """Total env steps, all sub-envs together; a resumed run trains until it has this many."""
    num_envs: int = 8
    """Parallel streams (dream: rows of one model batch; real: Memory Mazes in one process)."""
    horizon: int = 100
    """Training episode length in steps (dream episodes are truncated there, real ones too)."""
    context_frames: int = 9
    """Dream: real frames prefilled before each dreamed episode."""
    sampler_steps: int = 2
    """Dream: denoiser calls per dreamed frame."""
    eval_every: int = 5_000
    """Evaluate in the real maze every this many env steps (0: only at the end)."""
    eval_episodes: int = 5
    """Real episodes per evaluation (0: no evaluation)."""
    eval_max_steps: int = 1_000
    """Steps per evaluation episode (Memory Maze 9x9 episodes end at 1000 anyway)."""
    eval_seed: int = 10_000
    """Evaluation episode i is played on maze seed eval_seed + i, every time."""
    eval_deterministic: bool = False
    """Evaluate the policy's argmax action instead of sampling it (an argmax policy tends to loop
    on one action in a partially observed maze, so sampling is the default)."""
    eval_random: bool = True
    """Also score a uniformly random policy on the evaluation seeds (once per run)."""
    checkpoint_every: int | None = None
    """Write a checkpoint every this many env steps (default: eval_every; 0: only at the end)."""
    seed: int = 0
    """Seeds SB3 (networks, action sampling) and the envs."""
    device: str = "auto"
    """auto, cpu or cuda (the policy and the world model)."""
    tensorboard: bool = True
    """Log to run_dir/tb (the TensorBoard folder of every run kind)."""
    progress: bool = False
    """Show SB3's progress bar."""

    def check(self) -> None:
        """ValueError naming the first bad setting; nothing is built before this passes."""
        algo = algorithm_class(self.algo)
        maze_env_id(self.env_id)
        if self.world not in WORLDS:
            raise ValueError(f"unknown world {self.world!r}; choose one of {list(WORLDS)}")
        if self.policy not in algo.policy_aliases:
            raise ValueError(f"unknown policy {self.policy!r} for {self.algo}; choose one of {sorted(algo.policy_aliases)}")
        for name in ("steps", "num_envs", "horizon", "context_frames", "sampler_steps", "eval_max_steps",
                     "context_mazes", "context_walk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        longest = gym.spec(self.env_id).max_episode_steps
        if self.context_walk >= longest:
            raise ValueError(f"context_walk must be < {longest} ({self.env_id}'s episode length), got {self.context_walk}")
        for name in ("eval_every", "eval_episodes", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name in ("policy_kwargs", "hyperparameters"):
            try:
                json.dumps(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"{name} must be JSON-able (they are stored in agent.json): {e}") from None


# ------------------------------------------------------------------------------ training envs
def world_model_identity(checkpoint) -> dict[str, Any]:
    """Path and sha256 of the weights a dream loads, so an agent names the exact model it learned in."""
    if is_bundle(checkpoint):
        manifest = read_manifest(checkpoint)
        return {"checkpoint": str(Path(checkpoint).resolve()), "sha256": manifest["files"].get(WEIGHTS_FILE)}
    folder = resolve_checkpoint(checkpoint)
    return {"checkpoint": str(folder.resolve()), "sha256": sha256_file(folder / EMA_FILE)}


def collect_context_pool(env: str | int, mazes: int, walk: int, seed: int = 0):
    """Real frames to start dreams from: `mazes` mazes (seeds seed, seed + 1, ...), each walked for
    `walk` uniformly random steps, as a `ClipContext` that cuts clips anywhere in these walks."""
    maze = gym.make(maze_env_id(env), disable_env_checker=True)
    rng = np.random.default_rng(seed)
    frames, actions = [], []
    try:
        for k in range(mazes):
            obs, _ = maze.reset(seed=seed + k)
            walk_actions = rng.integers(maze.action_space.n, size=walk)
            frames.append(np.stack([obs, *(maze.step(int(a))[0] for a in walk_actions)]))
            actions.append(walk_actions.astype(np.int64))
    finally:
        maze.close()
    return ClipContext(frames, actions)


def make_dream_vec_env(cfg: AgentTrainConfig, device: torch.device) -> tuple[VecEnv, dict[str, Any]]:
    """(SB3 VecEnv of `num_envs` dream streams, world descriptor)."""
    size = maze_size(cfg.env_id)
    checkpoint = resolve_dream_checkpoint(cfg.checkpoint, size)  # None / "bundled": the bundled model
    model, codec = load_dream_model(checkpoint, cfg.codec, device=device)
    if cfg.dataset is not None:
        context, source = MinariContext(cfg.dataset, cfg.context_frames), cfg.dataset
    else:
        context = collect_context_pool(cfg.env_id, cfg.context_mazes, max(cfg.context_walk, cfg.context_frames - 1),
                                       seed=cfg.seed)
        source = f"{cfg.context_mazes} random walks of {cfg.context_walk} steps in {cfg.env_id} (seeds {cfg.seed}..)"
    vec = DreamSB3VecEnv(cfg.num_envs, model=model, codec=codec, context=context, context_frames=cfg.context_frames,
                         horizon=cfg.horizon, sampler_steps=cfg.sampler_steps)
    world = {"kind": "dream", **world_model_identity(checkpoint), "maze_size": size, "horizon": cfg.horizon,
             "sampler_steps": cfg.sampler_steps, "context": source}
    return VecMonitor(vec), world


def make_real_vec_env(cfg: AgentTrainConfig) -> tuple[VecEnv, dict[str, Any]]:
    """`num_envs` real mazes in one process (MuJoCo renders on the CPU: extra processes only pay
    off with spare cores), episodes cut at `horizon` like the dream's."""
    def make() -> gym.Env:
        return Monitor(gym.make(cfg.env_id, max_episode_steps=cfg.horizon, disable_env_checker=True))

    world = {"kind": "real", "env_id": cfg.env_id, "horizon": cfg.horizon}
    return DummyVecEnv([make] * cfg.num_envs), world


# ------------------------------------------------------------------------------ callbacks
class RealEvalCallback(BaseCallback):
    """Evaluates the policy in the real maze every `every` env steps (see the module doc)."""

    def __init__(self, evaluator: RealMazeEvaluator, every: int, deterministic: bool, history: list[dict],
                 random_baseline: dict | None, with_random: bool) -> None:
        super().__init__()
        self.evaluator, self.every, self.deterministic = evaluator, every, deterministic
        self.history, self.random_baseline, self.with_random = history, random_baseline, with_random
        self.seconds = 0.0  # spent evaluating: excluded from the training throughput
        self._next = 0

    def _on_training_start(self) -> None:
        self._next = (self.num_timesteps // self.every + 1) * self.every if self.every else 0

    def _on_step(self) -> bool:
        if self.every and self.num_timesteps >= self._next:
            self.evaluate()
            self._next = (self.num_timesteps // self.every + 1) * self.every
        return True

    def evaluate(self) -> dict[str, Any]:
        start = time.perf_counter()
        if self.with_random and self.random_baseline is None:
            self.random_baseline = self.evaluator.random()
        scores = self.evaluator.policy(self.model.policy, self.deterministic)
        entry = {"num_timesteps": int(self.num_timesteps), "mean": scores["mean"], "std": scores["std"],
                 "returns": scores["returns"]}
        self.history.append(entry)
        self.logger.record("eval/mean_return", scores["mean"])
        self.logger.record("eval/std_return", scores["std"])
        if self.random_baseline is not None:  # a flat reference line beside the agent's curve
            self.logger.record("eval/random_mean_return", self.random_baseline["mean"])
        self.logger.dump(self.num_timesteps)
        self.seconds += time.perf_counter() - start
        return entry


class AgentCheckpointCallback(BaseCallback):
    """Writes an agent checkpoint every `every` env steps through `save(model)`."""

    def __init__(self, every: int, save: Callable[[BaseAlgorithm], Path]) -> None:
        super().__init__()
        self.every, self.save = every, save
        self.seconds = 0.0
        self._next = 0

    def _on_training_start(self) -> None:
        self._next = (self.num_timesteps // self.every + 1) * self.every if self.every else 0

    def _on_step(self) -> bool:
        if self.every and self.num_timesteps >= self._next:
            start = time.perf_counter()
            self.save(self.model)
            self.seconds += time.perf_counter() - start
            self._next = (self.num_timesteps // self.every + 1) * self.every
        return True


# ------------------------------------------------------------------------------ training
def _tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None  # SB3 writes through torch's SummaryWriter


def train_agent(cfg: AgentTrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or, with `resume`, continue) an agent as `cfg` says; see the module doc.

    Returns {"run_dir", "checkpoint", "num_timesteps", "trained_steps", "train_seconds",
    "env_steps_per_s" (training alone, evaluations and checkpoints excluded), "eval_history",
    "random_baseline", "world"}.
    """
    cfg.check()
    algo = cfg.algo.lower()
    run_dir = Path(cfg.run_dir)
    previous = latest_agent(run_dir)
    if previous is not None and not resume:
        raise ValueError(f"{run_dir} already holds an agent ({previous.name}): pass resume=True (--resume) "
                         "to continue it, or another run dir")
    meta = read_agent_meta(previous) if previous is not None else None
    if meta is not None and (meta["algorithm"], meta["policy"]) != (algo, cfg.policy):
        raise ValueError(f"{run_dir} holds a {meta['algorithm']} {meta['policy']} agent; cannot resume it "
                         f"as {algo} {cfg.policy}")
    start = int(meta["num_timesteps"]) if meta else 0
    if meta is not None and start >= cfg.steps:  # already trained this far: nothing to build
        return {"run_dir": str(run_dir), "checkpoint": str(previous), "num_timesteps": start, "trained_steps": 0,
                "train_seconds": 0.0, "env_steps_per_s": None, "eval_history": meta["eval_history"],
                "random_baseline": meta.get("random_baseline"), "world": meta["world"]}
    if cfg.world == "dream" and cfg.dataset is None:  # the maze's own walks are the dream's context
        _check_dream_fits_maze(cfg, "its context clips would come from random walks in the real maze "
                                    "(pass dataset= / --dataset with clips recorded in the model's actions)")
    if cfg.world == "dream" and cfg.eval_episodes:  # fail now, not after training, if the maze cannot score it
        _check_dream_fits_maze(cfg, "an agent trained in this dream could not be evaluated there "
                                    "(pass eval_episodes=0 / --eval-episodes 0 to train anyway)")

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    venv, world = make_dream_vec_env(cfg, device) if cfg.world == "dream" else make_real_vec_env(cfg)
    evaluator = RealMazeEvaluator(cfg.env_id, max(1, cfg.eval_episodes), cfg.eval_max_steps, cfg.eval_seed)
    try:
        if meta is not None:
            check_spaces(meta, venv.observation_space, venv.action_space, f"resuming {previous}")
        hparams = default_hyperparameters(algo, cfg.steps, cfg.num_envs, cfg.hyperparameters)
        tensorboard = cfg.tensorboard and _tensorboard_available()
        if cfg.tensorboard and not tensorboard:
            warnings.warn("tensorboard is not installed: no TensorBoard logs (the eval history still goes to "
                          "agent.json); pip install tensorboard", stacklevel=2)
        try:
            model = ALGORITHMS[algo](
                cfg.policy, venv, policy_kwargs=dict(cfg.policy_kwargs), seed=cfg.seed + start, device=device,
                tensorboard_log=str(run_dir / TENSORBOARD_DIR) if tensorboard else None, verbose=0, **hparams,
            )
        except TypeError as e:  # a misspelt hyper-parameter or policy argument
            raise ValueError(f"{algo} with hyper-parameters {hparams} and policy_kwargs {cfg.policy_kwargs}: {e}") from None
        sessions = list(meta["sessions"]) if meta else []
        if meta is not None:
            load_policy_weights(previous, model.policy, meta)
            load_optimizer_state(previous, model.policy, model.policy.optimizer, meta)
            model.num_timesteps = start

        history: list[dict] = list(meta["eval_history"]) if meta else []
        eval_cb = RealEvalCallback(evaluator, cfg.eval_every if cfg.eval_episodes else 0, cfg.eval_deterministic,
                                   history, meta.get("random_baseline") if meta else None, cfg.eval_random)
        observation_space, action_space = venv.observation_space, venv.action_space

        def save(m: BaseAlgorithm) -> Path:
            session = {"world": world["kind"], "from_timesteps": start, "to_timesteps": int(m.num_timesteps)}
            return save_agent(run_dir, policy=m.policy, optimizer=m.policy.optimizer, num_timesteps=m.num_timesteps, meta={
                "algorithm": algo, "policy": cfg.policy, "policy_class": type(m.policy).__name__,
                "policy_kwargs": cfg.policy_kwargs, "hyperparameters": hparams,
                "observation_space": space_summary(observation_space), "action_space": space_summary(action_space),
                "world": world, "sessions": [*sessions, session], "train_config": asdict(cfg),
                "eval_settings": {**evaluator.settings, "deterministic": cfg.eval_deterministic},
                "eval_history": history, "random_baseline": eval_cb.random_baseline,
            })

        every = cfg.eval_every if cfg.checkpoint_every is None else cfg.checkpoint_every
        ckpt_cb = AgentCheckpointCallback(every, save)
        began = time.perf_counter()
        with warnings.catch_warnings():  # SB3's progress bar is tqdm.rich, which warns that it is "experimental"
            warnings.filterwarnings("ignore", message="rich is experimental")
            model.learn(total_timesteps=cfg.steps - start, callback=[eval_cb, ckpt_cb], tb_log_name=algo.upper(),
                        reset_num_timesteps=meta is None, progress_bar=cfg.progress)
        seconds = time.perf_counter() - began - eval_cb.seconds - ckpt_cb.seconds
        if cfg.eval_episodes and (not history or history[-1]["num_timesteps"] != model.num_timesteps):
            eval_cb.evaluate()  # the final policy is always scored
        folder = save(model)
    finally:
        venv.close()
        evaluator.close()
    trained = int(model.num_timesteps) - start
    return {"run_dir": str(run_dir), "checkpoint": str(folder), "num_timesteps": int(model.num_timesteps),
            "trained_steps": trained, "train_seconds": seconds,
            "env_steps_per_s": trained / seconds if trained and seconds > 0 else None,
            "eval_history": history, "random_baseline": eval_cb.random_baseline, "world": world}


def _check_dream_fits_maze(cfg: AgentTrainConfig, why: str) -> None:
    """ValueError when the world model's actions are not the real maze's (`why` says what breaks)."""
    checkpoint = resolve_dream_checkpoint(cfg.checkpoint, maze_size(cfg.env_id))
    dream_actions = action_space_for(_model_config(checkpoint))
    real_actions = real_spaces()[1]
    if space_summary(dream_actions) != space_summary(real_actions):
        raise ValueError(f"the world model {checkpoint} takes actions {dream_actions}, the real maze "
                         f"{cfg.env_id} {real_actions}: {why}")


def _model_config(checkpoint):
    sidecar = read_manifest(checkpoint) if is_bundle(checkpoint) else read_sidecar(checkpoint)
    return ModelConfig.from_dict(sidecar["model_config"])
