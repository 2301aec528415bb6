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
