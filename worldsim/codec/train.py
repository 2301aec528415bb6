"""Train the frame codec on the frames of Minari datasets (the codec stage of `worldsim train`).

Data: every frame of every episode (a `WindowDataset` of 1-step windows), except the last
`val_episodes` episodes of each dataset, which are held out for the PSNR reported during
training. Batches depend only on (seed, step), so a resumed run sees the same frames as an
uninterrupted one.

Loss: L1 + MSE on pixels in [-1, 1], plus an L1 on horizontal/vertical pixel differences (an
"edge" term: cheap, and it sharpens the thin wall edges that L1/MSE alone blur). No perceptual
(LPIPS) loss: its VGG weights are not available offline.

Run folder layout:
  latest.json                       {"step": N, "checkpoint": "checkpoints/step_00000N"}
  checkpoints/step_00000N/          codec.json + codec.safetensors (load with `load_codec`),
                                    trainer.json + trainer.safetensors (optimizer, RNG, step)
  tb/                               TensorBoard scalars and reconstruction images
A checkpoint folder is written under a temporary name and renamed into place, then latest.json
is replaced atomically (`utils.checkpoint_folders`, shared with the world-model and agent
checkpoints): a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from worldsim.codec.autoencoder import CodecConfig, FrameCodec, measure_latent_stats, preset, psnr
from worldsim.codec.checkpoint import load_codec_into, read_config, save_codec
from worldsim.utils.safetensors_io import open_safetensors, safetensors_bytes
from worldsim.data.windows import WindowDataset
from worldsim.utils.atomic import atomic_write_bytes, atomic_write_json
from worldsim.utils.training import TrainingDiverged, diverged, setting_differences, warmup_cosine  # noqa: F401 (TrainingDiverged re-exported)
from worldsim.utils.checkpoint_folders import (
    LATEST_FILE, TENSORBOARD_DIR, CheckpointError, commit_checkpoint, read_latest_pointer, temp_folder,
)

TRAINER_STATE_VERSION = 1
TRAINER_FILE = "trainer.json"  # written last into a checkpoint folder
# Settings a resumed run must share with the run it continues (else batches or model differ).
RESUME_KEYS = ("datasets", "batch_size", "seed", "val_episodes", "hflip", "init_from", "decoder_only")
# What runs written before a key existed did (they lack it in their saved config).
LEGACY_DEFAULTS = {"init_from": None, "decoder_only": False}


@dataclass
class CodecTrainConfig:
    datasets: tuple[str, ...]
    """Minari dataset ids or folders; their frames must all be image_size x image_size x 3."""
    run_dir: str
    """Folder for checkpoints, latest.json and TensorBoard logs."""
    preset: str = "small"
    """Codec preset (see `worldsim.codec.autoencoder.PRESETS`)."""
    codec: CodecConfig | None = None
    """Explicit codec config; overrides `preset` when given."""
    init_from: str | None = None
    """Start from this codec's weights and latent stats (a codec checkpoint, a codec run folder or
    a bundle folder); its config is used, `preset` and `codec` are ignored."""
    decoder_only: bool = False
    """Train the decoder alone (needs `init_from`): the encoder and the latent stats stay as they
    were, so the latent space, and every world model and latent cache built on it, stay valid."""
    steps: int = 20_000
    """Total optimisation steps (the LR schedule spans them)."""
    stop_after: int | None = None
    """Checkpoint and stop at this step in this session (resume later to reach `steps`)."""
    batch_size: int = 32
    """Frames per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate, after a linear warmup; cosine decay to lr * min_lr_ratio."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr`."""
    warmup_steps: int = 200
    """Linear warmup steps."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    l1_weight: float = 1.0
    """Weight of the pixel L1 loss."""
    mse_weight: float = 1.0
    """Weight of the pixel MSE loss."""
    edge_weight: float = 0.5
    """Weight of the L1 loss on horizontal and vertical pixel differences (sharpens thin edges)."""
    texture_weight: float = 0.0
    """Weight of the texture loss: L1 between the local gradient amplitude of reconstruction and
    frame, per `TEXTURE_CELL` square (`texture_loss`). 0 = off."""
    hflip: bool = True
    """Mirror half the frames of each batch (a mirrored maze view is still a valid frame)."""
    val_episodes: int = 1
    """Episodes held out at the end of each dataset for validation PSNR."""
    val_frames: int = 256
    """Held-out frames (evenly spaced) the PSNR is measured on."""
    stats_frames: int = 1024
    """Training frames the latent mean/std are measured on at each checkpoint."""
    eval_every: int = 500
    """Steps between held-out PSNR evaluations."""
    checkpoint_every: int = 500
    """Steps between checkpoints; one is always written at the end."""
    log_every: int = 20
    """Steps between TensorBoard scalars (losses, lr, grad norm)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk."""
    seed: int = 0
    """Seeds the weights, the batch order and the augmentation."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:1..."""
    num_workers: int = 0
    """DataLoader workers reading frames (0: in the training process)."""
    progress: bool = True
    """Show a progress bar."""

    def codec_config(self) -> CodecConfig:
        if self.init_from is not None:
            return read_config(self.init_from)
        return self.codec if self.codec is not None else preset(self.preset)

    def validate(self) -> None:
        if not self.datasets:
            raise ValueError("at least one dataset is needed")
        positive = ("steps", "batch_size", "eval_every", "checkpoint_every", "log_every")
        for name in (*positive, "keep_checkpoints", "val_frames", "stats_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.stop_after is not None and not 0 < self.stop_after <= self.steps:
            raise ValueError(f"stop_after must be in 1..{self.steps}, got {self.stop_after}")
        if self.val_episodes < 1:
            raise ValueError("val_episodes must be >= 1: PSNR must come from unseen frames")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("l1_weight", "mse_weight", "edge_weight", "texture_weight"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.decoder_only and self.init_from is None:
            raise ValueError("decoder_only needs init_from: a trained encoder to keep")

    def to_json(self) -> dict:
        d = asdict(self)
        d["datasets"] = [str(s) for s in self.datasets]
        d["codec"] = self.codec_config().to_dict()
        return d


@dataclass
class CodecTrainResult:
    step: int
    val_psnr: float
    """Mean per-frame PSNR (dB) of uint8 reconstructions of held-out frames, at `step`."""
    checkpoint: Path
    train_seconds: float
    """Optimisation time over all sessions of the run (excludes evaluation and checkpoints)."""
    history: list[tuple[int, float]] = field(default_factory=list)
    """(step, val PSNR) of each evaluation in this session."""


# ------------------------------------------------------------------------------------ data
class FrameSplit:
    """Flat frame indices of a 1-step WindowDataset, split by episode into train / held-out."""

    def __init__(self, dataset: WindowDataset, val_episodes: int) -> None:
        # (N, 2): source, episode of every frame
        where = np.array([dataset.locate(i)[:2] for i in range(len(dataset))])
        val = np.zeros(len(dataset), bool)
        for source in np.unique(where[:, 0]):
            mine = where[:, 0] == source
            episodes = np.unique(where[mine, 1])
            if len(episodes) <= val_episodes:
                raise ValueError(
                    f"dataset {dataset.stores[source].name!r} has {len(episodes)} episodes: "
                    f"holding out {val_episodes} for validation leaves none to train on"
                )
            val |= mine & np.isin(where[:, 1], episodes[-val_episodes:])
        self.train = np.nonzero(~val)[0]
        self.val = np.nonzero(val)[0]


def evenly_spaced(indices: np.ndarray, n: int) -> np.ndarray:
    return indices[np.linspace(0, len(indices) - 1, min(n, len(indices))).round().astype(int)]


def load_frames(dataset: WindowDataset, indices: np.ndarray) -> torch.Tensor:
    return torch.stack([dataset[int(i)]["frames"][0] for i in indices])  # (N, H, W, 3) uint8


class StepBatches(Sampler[list[int]]):
    """Step b's batch: [b*B, (b+1)*B) of seeded permutations of train frames."""

    def __init__(
        self, train: np.ndarray, batch_size: int, seed: int, first_step: int, last_step: int
    ) -> None:
        self.train, self.batch_size, self.seed = train, batch_size, seed
        self.first_step, self.last_step = first_step, last_step

    def _epoch(self, epoch: int) -> np.ndarray:
        return self.train[np.random.default_rng([self.seed, epoch]).permutation(len(self.train))]

    def __iter__(self):
        n = len(self.train)
        cached: dict[int, np.ndarray] = {}
        for step in range(self.first_step, self.last_step):
            pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
            batch = []
            for epoch in np.unique(pos // n):
                if epoch not in cached:
                    cached = {epoch: self._epoch(int(epoch))}  # keep one epoch in memory
                batch += cached[epoch][pos[pos // n == epoch] % n].tolist()
            yield batch

    def __len__(self) -> int:
        return self.last_step - self.first_step


def _collate(items: list[dict]) -> torch.Tensor:
    return torch.stack([item["frames"][0] for item in items])  # (B, H, W, 3) uint8


# ----------------------------------------------------------------------------------- losses
def to_signed(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0


TEXTURE_CELL = 4
"""Side in pixels of the squares over which `texture_loss` compares gradient energy."""


def local_gradient_amplitude(x: torch.Tensor, cell: int = TEXTURE_CELL) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H / cell, W / cell): root mean squared pixel difference per square."""
    gx = F.pad(x.diff(dim=-1).square(), (0, 1))  # (B, 3, H, W), the last column's difference is 0
    gy = F.pad(x.diff(dim=-2).square(), (0, 0, 0, 1))
    energy = F.avg_pool2d((gx + gy).sum(1, keepdim=True), cell)
    return (energy + 1e-6).sqrt()


def texture_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the local gradient amplitudes of recon and target (B, 3, H, W).

    Why: where the latent does not pin down a texture's phase (the bricks of a wall seen from
    afar), the pixel losses are least by drawing no texture at all, so a decoder trained on them
    alone returns flat, blurred walls (its reconstructions kept about half of real frames'
    gradient energy). This loss asks for as much texture per square as the frame has, wherever it
    lies inside the square, which the pixel losses then align where the latent allows.
    """
    return F.l1_loss(local_gradient_amplitude(recon), local_gradient_amplitude(target))


def reconstruction_losses(recon: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    diff = recon - target  # (B, 3, H, W)
    edge = F.l1_loss(recon.diff(dim=-1), target.diff(dim=-1))  # horizontal differences
    edge = edge + F.l1_loss(recon.diff(dim=-2), target.diff(dim=-2))  # vertical
    return {"l1": diff.abs().mean(), "mse": diff.pow(2).mean(), "edge": edge, "texture": texture_loss(recon, target)}


def learning_rate(cfg: CodecTrainConfig, step: int) -> float:
    return cfg.lr * warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)


@torch.no_grad()
def evaluate_psnr(
    codec: FrameCodec, frames: torch.Tensor, batch: int = 256
) -> tuple[float, torch.Tensor]:
    """Mean per-frame PSNR of encode -> decode (uint8) over frames (N, H, W, 3), and the recons."""
    was_training = codec.training
    codec.eval()
    recons = torch.cat(
        [
            codec.decode(codec.encode(frames[i : i + batch]), as_uint8=True).cpu()
            for i in range(0, len(frames), batch)
        ]
    )
    codec.train(was_training)
    return float(psnr(frames.cpu(), recons).mean()), recons


# ------------------------------------------------------------------------- trainer state I/O
def _save_trainer_state(
    folder: Path, optimizer: torch.optim.Optimizer, generator: torch.Generator, state: dict
) -> None:
    sd = optimizer.state_dict()
    tensors = {"rng.generator": generator.get_state()}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    atomic_write_bytes(folder / "trainer.safetensors", safetensors_bytes(tensors))
    atomic_write_json(
        folder / TRAINER_FILE,
        {
            "version": TRAINER_STATE_VERSION,
            **state,
            "optimizer_param_groups": sd["param_groups"],
            "optimizer_scalars": scalars,
        },
    )


def _load_trainer_state(
    folder: Path, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> dict:
    state = json.loads((folder / TRAINER_FILE).read_text())
    if state.get("version") != TRAINER_STATE_VERSION:
        raise CheckpointError(
            f"{folder / TRAINER_FILE}: trainer state version {state.get('version')!r}, "
            f"expected {TRAINER_STATE_VERSION}"
        )
    with open_safetensors(folder / "trainer.safetensors", error=CheckpointError) as f:  # names a truncated file
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    generator.set_state(tensors.pop("rng.generator"))
    per_param: dict[int, dict] = {int(p): dict(v) for p, v in state["optimizer_scalars"].items()}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        per_param.setdefault(int(pid), {})[name] = value
    groups = state["optimizer_param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    return state


def _write_checkpoint(
    run_dir: Path, codec: FrameCodec, optimizer, generator, state: dict, keep: int
) -> Path:
    tmp = temp_folder(run_dir, state["step"])
    init_from = state["train_config"]["init_from"]
    save_codec(codec, tmp, extra={"step": state["step"], "init_from": init_from})
    _save_trainer_state(tmp, optimizer, generator, state)  # trainer.json last: marks a full folder
    return commit_checkpoint(run_dir, tmp, state["step"], keep=keep, marker=TRAINER_FILE)


def _check_resumable(saved: dict, cfg: CodecTrainConfig, folder: Path) -> None:
    now = cfg.to_json()
    if saved["codec"] != now["codec"]:
        found = CodecConfig.from_dict(saved["codec"])
        diff = [
            f"{k}: run has {v!r}, asked for {now['codec'][k]!r}"
            for k, v in found.to_dict().items()
            if v != now["codec"][k]
        ]
        raise CheckpointError(f"cannot resume {folder}: codec config differs: " + "; ".join(diff))
    diff = setting_differences(saved, now, RESUME_KEYS, legacy=LEGACY_DEFAULTS)
    if diff:
        raise CheckpointError(
            f"cannot resume {folder}: {'; '.join(diff)} (start a new run folder to change them)"
        )


# ------------------------------------------------------------------------------------ train
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_codec(cfg: CodecTrainConfig, *, resume: bool = False) -> CodecTrainResult:
    """Train (or, with `resume`, continue) a codec run; returns the last step's held-out PSNR."""
    cfg.validate()
    run_dir = Path(cfg.run_dir)
    codec_cfg = cfg.codec_config()
    device = _device(cfg.device)

    dataset = WindowDataset(list(cfg.datasets), window=1)
    h, w, c = dataset.frame_shape
    if (h, w, c) != (codec_cfg.image_size, codec_cfg.image_size, codec_cfg.image_channels):
        raise ValueError(
            f"dataset frames are {h}x{w}x{c} but the codec expects "
            f"{codec_cfg.image_size}x{codec_cfg.image_size}x{codec_cfg.image_channels}"
        )
    split = FrameSplit(dataset, cfg.val_episodes)
    val_frames = load_frames(dataset, evenly_spaced(split.val, cfg.val_frames))  # (V, H, W, 3)
    # (S, H, W, 3): fixed training frames for the latent mean / std
    stats_frames = load_frames(dataset, evenly_spaced(split.train, cfg.stats_frames))

    torch.manual_seed(cfg.seed)  # the initial weights
    codec = FrameCodec(codec_cfg).to(device)
    if cfg.init_from is not None:
        load_codec_into(codec, cfg.init_from)
    trained = codec.decoder if cfg.decoder_only else codec
    codec.encoder.requires_grad_(not cfg.decoder_only)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)  # augmentation draws

    step, train_seconds, last_psnr = 0, 0.0, float("nan")
    last_ckpt = None
    if (run_dir / LATEST_FILE).exists():
        if not resume:
            raise FileExistsError(
                f"{run_dir} already holds a run; pass resume=True (--resume) to continue it, "
                f"or pick a new folder"
            )
        last_ckpt = read_latest_pointer(run_dir)
        state = json.loads((last_ckpt / TRAINER_FILE).read_text())
        _check_resumable(state["train_config"], cfg, last_ckpt)
        load_codec_into(codec, last_ckpt)
        state = _load_trainer_state(last_ckpt, optimizer, generator)
        step, train_seconds, last_psnr = state["step"], state["train_seconds"], state["val_psnr"]
    elif resume:
        raise FileNotFoundError(f"nothing to resume: {run_dir / LATEST_FILE} does not exist")
    run_dir.mkdir(parents=True, exist_ok=True)
    end = cfg.steps if cfg.stop_after is None else cfg.stop_after

    from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard is the [train] extra

    # purge_step drops events a crashed session logged after its last checkpoint.
    writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=step)
    loader = DataLoader(
        dataset, batch_sampler=StepBatches(split.train, cfg.batch_size, cfg.seed, step, end),
        num_workers=cfg.num_workers, collate_fn=_collate,
    )  # fmt: skip

    def checkpoint() -> Path:
        if not cfg.decoder_only:  # a frozen encoder keeps the stats it came with
            mean, std = measure_latent_stats(codec, stats_frames)
            codec.set_latent_stats(mean.to(device), std.to(device))
        state = {
            "step": step,
            "train_seconds": train_seconds,
            "val_psnr": last_psnr,
            "train_config": cfg.to_json(),
        }
        return _write_checkpoint(run_dir, codec, optimizer, generator, state, cfg.keep_checkpoints)

    history: list[tuple[int, float]] = []
    bar = tqdm(total=end, initial=step, desc="codec", disable=not cfg.progress, dynamic_ncols=True)
    codec.train()
    try:
        for frames in loader:
            t0 = time.perf_counter()
            x = to_signed(frames.to(device))  # (B, 3, H, W)
            if cfg.hflip:
                flip = (torch.rand(len(x), generator=generator) < 0.5).to(device)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.decoder_only:
                with torch.no_grad():
                    z = codec.encode_raw(x)  # (B, C, h, w)
                recon = codec.decode_raw(z)
            else:
                recon = codec(x)
            losses = reconstruction_losses(recon, x)
            loss = (
                cfg.l1_weight * losses["l1"]
                + cfg.mse_weight * losses["mse"]
                + cfg.edge_weight * losses["edge"]
                + cfg.texture_weight * losses["texture"]
            )
            if not torch.isfinite(loss):
                raise diverged("loss", loss.item(), step + 1, last_ckpt, lr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
            if not torch.isfinite(grad_norm):
                raise diverged("gradient norm", grad_norm.item(), step + 1, last_ckpt, lr)
            optimizer.step()
            step += 1
            train_seconds += time.perf_counter() - t0
            bar.update(1)

            if step % cfg.log_every == 0:
                writer.add_scalar("train/loss", loss.item(), step)
                for k, v in losses.items():
                    writer.add_scalar(f"train/{k}", v.item(), step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/grad_norm", grad_norm.item(), step)
                writer.add_scalar("train/sec_per_step", train_seconds / max(step, 1), step)
                bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{last_psnr:.2f}")
            if step % cfg.eval_every == 0 or step == end:
                last_psnr, recons = evaluate_psnr(codec, val_frames.to(device))
                history.append((step, last_psnr))
                writer.add_scalar("val/psnr", last_psnr, step)
                # (8, 2H, W, 3): each frame above its reconstruction
                pairs = torch.cat([val_frames[:8], recons[:8]], dim=1)
                writer.add_images("val/frame_over_reconstruction", pairs, step, dataformats="NHWC")
                bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{last_psnr:.2f}")
            if step % cfg.checkpoint_every == 0 or step == end:
                last_ckpt = checkpoint()
    finally:
        bar.close()
        writer.close()
    return CodecTrainResult(
        step=step, val_psnr=last_psnr, checkpoint=last_ckpt, train_seconds=train_seconds,
        history=history,
    )  # fmt: skip
