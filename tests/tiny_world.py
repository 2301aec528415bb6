"""Real tiny world models for tests: the tiny codec and WorldModel presets, optionally saved as a
`worldsim train`-style run folder. Random weights, but with the zero-initialised adaLN gates and
heads opened, so outputs depend on the inputs and the state (at init they would not)."""

from pathlib import Path

import torch

from worldsim.codec.autoencoder import FrameCodec, preset
from worldsim.codec.checkpoint import save_codec
from worldsim.model.config import make_config
from worldsim.model.world_model import WorldModel
from worldsim.train.checkpoint import save_checkpoint
from worldsim.train.ema import EMA


def open_gates(model: torch.nn.Module, std: float = 0.05) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, std)


def tiny_model(**overrides) -> WorldModel:
    """The tiny preset on the tiny codec's (4, 16, 16) latent, gates opened."""
    overrides = {"latent_channels": 4, "latent_grid": (16, 16), "patch": 2, **overrides}
    model = WorldModel(make_config("tiny", **overrides)).eval()
    open_gates(model)
    return model


def tiny_parts(seed: int = 0, **overrides) -> tuple[WorldModel, FrameCodec]:
    torch.manual_seed(seed)
    codec = FrameCodec(preset("tiny")).eval()
    return tiny_model(**overrides), codec


def save_run(run_dir: Path, model: WorldModel, codec_dir: Path, codec: FrameCodec) -> Path:
    """A run folder whose sidecar names the codec, as `worldsim train` writes it."""
    save_checkpoint(run_dir, step=1, model=model, model_config=model.cfg.to_dict(),
                    optimizer=torch.optim.AdamW(model.parameters()), ema=EMA(model),
                    extra={"codec": {"path": str(codec_dir), "config": codec.config.to_dict()},
                           "sigma_data": 1.0})
    return run_dir


def save_tiny_run(root: Path, seed: int = 0) -> Path:
    model, codec = tiny_parts(seed)
    return save_run(root / "run", model, save_codec(codec, root / "codec"), codec)


def save_tiny_bundle(out: Path, seed: int = 0, clips: int = 2, clip_frames: int = 12) -> Path:
    """A model bundle (`worldsim.bundled`) of the tiny model and codec with random 64x64 context
    clips, learned maze size 9: what `checkpoint=None` / "bundled" loads when WORLDSIM_BUNDLE_DIR
    points at it. The model never predicts termination, so episodes end by time limit."""
    import numpy as np

    from worldsim.bundled import Clips, write_bundle

    model, codec = tiny_parts(seed)
    with torch.no_grad():
        model.net.heads.mlp[-1].bias[1] = -100.0
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (clips, clip_frames, 64, 64, 3), dtype=np.uint8)
    actions = rng.integers(0, 6, (clips, clip_frames - 1))
    return write_bundle(out, model=model, codec=codec, clips=Clips(frames=frames, actions=actions),
                        dtype="float32", maze_size=9)


def save_tiny_agent(run_dir: Path, n_actions: int = 6) -> Path:
    """An agent run folder as `worldsim agent train` writes it (safetensors + JSON): an untrained
    PPO CnnPolicy for 64x64x3 frames and `n_actions` discrete actions."""
    import gymnasium as gym
    import numpy as np
    from stable_baselines3 import PPO

    from worldsim.agents.agent_checkpoint import save_agent, space_summary
    from worldsim.agents.agent_eval import policy_observation_space

    frames, actions = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8), gym.spaces.Discrete(n_actions)
    torch.manual_seed(0)
    policy = PPO.policy_aliases["CnnPolicy"](policy_observation_space(frames), actions, lr_schedule=lambda _: 0.0)
    meta = {"algorithm": "ppo", "policy": "CnnPolicy", "policy_class": type(policy).__name__, "policy_kwargs": {},
            "hyperparameters": {}, "observation_space": space_summary(frames), "action_space": space_summary(actions),
            "world": {"kind": "dream"}, "sessions": [], "eval_history": [], "random_baseline": None}
    save_agent(run_dir, policy=policy, optimizer=policy.optimizer, meta=meta, num_timesteps=8)
    return run_dir


def save_tiny_dataset(root: Path, dataset_id: str = "test/tiny-v0", steps: int = 11) -> Path:
    """A Minari dataset (one episode of random 64x64 frames, 6 discrete actions) under `root`."""
    import gymnasium as gym
    import numpy as np

    from worldsim.data.minari_writer import DatasetWriter, Episode

    rng = np.random.default_rng(1)
    writer = DatasetWriter(dataset_id, gym.spaces.Box(0, 255, (64, 64, 3), np.uint8), gym.spaces.Discrete(6), root=root)
    no = np.zeros(steps, bool)
    writer.append(Episode(rng.integers(0, 256, (steps + 1, 64, 64, 3), dtype=np.uint8), rng.integers(0, 6, steps),
                          np.zeros(steps), no, no))
    return writer.path
