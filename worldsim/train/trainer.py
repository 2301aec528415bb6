"""Train the world model on Minari windows, in the latent space of a frozen frame codec.

One step: a batch of windows (B, T) of latents -> `world_model_loss` (diffusion forcing noise, EDM-weighted denoising loss, reward and termination
heads) -> AdamW with gradient clipping -> the EMA of the weights follows. The latents come from
the latent cache (`latent_cache`: every episode encoded once by the frozen codec before the first
step), or with `latent_cache=False` from encoding the window's uint8 frames at every step; both
give the same float32 latents.

Exact resume: everything random in a step comes from a generator seeded by (seed, step, rank)
and the windows of step s are a pure function of (seed, s) (`StepBatches`), so a run killed at any
point and resumed from its last checkpoint computes the same losses as an uninterrupted run. The
checkpoint still carries the optimizer, scheduler, EMA and global RNG states (`checkpoint`) so
nothing else can drift.

Run folder (`run_dir`): latest.json, checkpoints/step_XXXXXX/ (see `checkpoint`), tb/ (TensorBoard
scalars and rollout samples), samples/ (the same samples as PNG grids and GIFs), latents/ (the
latent cache, keyed by the codec's weights hash).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from worldsim.data.windows import WindowDataset, WindowSampler
from worldsim.diffusion.forcing import ForcingConfig
from worldsim.train import checkpoint as ckpt
from worldsim.train import distributed as ddp
from worldsim.train import latent_cache
from worldsim.train.ema import EMA
from worldsim.rollout.session import RolloutSession
from worldsim.utils import training
from worldsim.utils.training import TrainingDiverged, setting_differences, warmup_cosine  # noqa: F401 (TrainingDiverged re-exported)
from worldsim.codec.checkpoint import codec_fingerprint, codec_matches, load_codec, resolve_checkpoint
from worldsim.model.config import make_config
from worldsim.model.loss import world_model_loss
from worldsim.model.world_model import WorldModel
from worldsim.train.weights import WARM_START_FREE_FIELDS, parameter_groups, warm_start  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

# What runs saved before these settings were recorded trained with.
LEGACY_TRAIN_DEFAULTS = {"noise_mean": -0.4, "noise_std": 1.2, "p_long_context": 0.5}

# Settings a resumed run must share with the run it continues, else its batches, noise or
# schedule differ and the losses would not be those of an uninterrupted run.
RESUME_KEYS = ("datasets", "window", "batch_size", "seed", "steps", "lr", "min_lr_ratio", "warmup_steps",
               "weight_decay", "ema_decay", "noise_mean", "noise_std", "p_long_context", "direct_noise",
               "own_context", "noised_direct", "min_sigma_after_prefix")  # fmt: skip


@dataclass
class TrainConfig:
    datasets: tuple[str, ...]
    """Minari dataset ids or folders; same action space and frame size (e.g. `worldsim collect` output)."""
    codec: str
    """Frame codec: a checkpoint folder or a `worldsim train-codec` run folder. Frozen here."""
    run_dir: str = "runs/world-model"
    """Folder for latest.json, checkpoints/, tb/ and samples/."""
    preset: str = "tiny"
    """Model size preset (`worldsim.model.config.PRESETS`; cpu: small made fast to train on a CPU)."""
    variant: str = "lssvwm"
    """lssvwm or a baseline (`worldsim.model.config.VARIANTS`)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields to change, e.g. {"n_layers": 4}. Latent shape and actions come from the data."""
    window: int = 16
    """Frames per training window (T)."""
    batch_size: int = 8
    """Windows per step on each rank (the global batch is batch_size * world_size)."""
    steps: int = 10_000
    """Total optimisation steps; the LR schedule spans them."""
    stop_after: int | None = None
    """Checkpoint and stop at this step in this session (resume later to reach `steps`)."""
    lr: float = 3e-4
    """Peak AdamW learning rate, after a linear warmup; cosine decay to lr * min_lr_ratio."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr`."""
    weight_decay: float = 0.01
    """AdamW decay of matrices; biases, norms, embeddings marked `_no_weight_decay` get none."""
    warmup_steps: int = 200
    """Linear warmup from lr / warmup_steps to lr."""
    grad_clip: float = 1.0
    """Max global gradient norm (clip_grad_norm_); inf disables clipping but still logs the norm."""
    ema_decay: float = 0.999
    """Decay of the EMA weights used for samples and saved for inference (ema.safetensors)."""
    noise_mean: float = 0.3
    """Mean of ln(sigma) of the training noise levels (`diffusion.forcing.ForcingConfig.p_mean`).
    DIAMOND's -0.4 is for data of std 0.5; our latents have std 1, so the same noise relative to the
    data is -0.4 + ln 2 ~ 0.3. At -0.4 (this code's earlier default) few samples train the
    high-noise levels where a frame must be predicted from its context."""
    noise_std: float = 1.2
    """Std of ln(sigma) of the training noise levels (`ForcingConfig.p_std`)."""
    p_long_context: float = 0.5
    """Probability per window of a clean prefix longer than half the window (`ForcingConfig`)."""
    direct_noise: float = 0.0
    """Noise augmentation of the direct path: per-frame std drawn in [0, this] (`ForcingConfig`); 0 = off."""
    noised_direct: float = 0.0
    """Probability per window with a clean prefix that the direct path shows the frames after it noised,
    as the backbone does (`ForcingConfig.noised_direct`: memory training); 0 = off."""
    min_sigma_after_prefix: float = 0.0
    """Memory training: in windows with a clean prefix, the frames after it are noised at least this
    much (`ForcingConfig.min_sigma_after_prefix`), so beyond the attention window only the state's
    memory of the prefix predicts them; 0 = off."""
    own_context: float = 0.0
    """Probability per window that its context (direct path and clean prefix) is the model's own
    one-step predictions (`ForcingConfig.own_context`; two extra forward passes a step); 0 = off."""
    seed: int = 0
    """Seeds the initial weights, the window order and every step's noise."""
    log_every: int = 10
    """Steps between TensorBoard scalars (loss, metrics, lr, grad norm, steps/s)."""
    checkpoint_every: int = 1000
    """Steps between checkpoints; one is always written at the end."""
    sample_every: int = 1000
    """Steps between rollout samples (EMA model, open loop from real context); 0 disables them."""
    sample_count: int = 2
    """Windows rolled out per sample."""
    sample_context: int = 4
    """Real context frames before the generated ones (the rest of the window is generated)."""
    sample_steps: int = 4
    """Denoising steps per generated frame."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept on disk."""
    resume: bool = False
    """Continue the run in run_dir from its latest checkpoint (an existing run without it is an error)."""
    init_from: str | None = None
    """Warm start a new run from these weights: a bundle folder, a checkpoint or a run folder (its
    EMA weights). Its model config must equal this run's except for fields that only add layers
    (prev_frames) or pick kernels; the added layers start at their initialisation."""
    device: str = "auto"
    """auto (a GPU if present), cpu, cuda; under torchrun each rank takes its LOCAL_RANK GPU."""
    bf16: bool = False
    """bf16 autocast for the world model on CUDA (ignored, with a log line, on CPU)."""
    compile: bool = False
    """torch.compile the world model on CUDA (ignored, with a log line, on CPU)."""
    num_workers: int = 0
    """DataLoader worker processes reading windows (0: in the training process)."""
    latent_cache: bool = True
    """Encode every episode once into run_dir/latents/ and train on those latents, instead of
    encoding each batch's frames at every step (same latents, one encoding pass up front)."""
    progress: bool = True
    """Show a progress bar (rank 0)."""

    def validate(self) -> None:
        """ValueError naming the first bad field."""
        if not self.datasets:
            raise ValueError("datasets: at least one dataset is needed")
        if not self.codec:
            raise ValueError("codec: a codec checkpoint is needed (train one with `worldsim train-codec`)")
        positive = ("window", "batch_size", "steps", "log_every", "checkpoint_every", "keep_checkpoints",
                    "sample_count", "sample_steps", "warmup_steps")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sample_every", "num_workers", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.window < 3:
            raise ValueError(f"window must be >= 3 frames (diffusion forcing's clean prefix needs it), got {self.window}")
        if self.stop_after is not None and not 0 < self.stop_after <= self.steps:
            raise ValueError(f"stop_after must be in 1..steps ({self.steps}), got {self.stop_after}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (self.noise_std > 0 and math.isfinite(self.noise_mean)):
            raise ValueError(f"noise_std must be > 0 and noise_mean finite, got {self.noise_std}, {self.noise_mean}")
        if not 0 < self.p_long_context <= 1:
            raise ValueError(f"p_long_context must be in (0, 1] (the reward heads train on the clean prefix), got {self.p_long_context}")
        if not (0 <= self.direct_noise and math.isfinite(self.direct_noise)):
            raise ValueError(f"direct_noise must be a finite number >= 0, got {self.direct_noise}")
        if not 0 <= self.noised_direct <= 1:
            raise ValueError(f"noised_direct must be a probability in [0, 1], got {self.noised_direct}")
        if not (0 <= self.min_sigma_after_prefix and math.isfinite(self.min_sigma_after_prefix)):
            raise ValueError(f"min_sigma_after_prefix must be a finite number >= 0, got {self.min_sigma_after_prefix}")
        if not 0 <= self.own_context <= 1:
            raise ValueError(f"own_context must be a probability in [0, 1], got {self.own_context}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (inf to disable), got {self.grad_clip}")
        if not 1 <= self.sample_context < self.window:
            raise ValueError(f"sample_context must be in 1..window-1 ({self.window - 1}), got {self.sample_context}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["datasets"] = [str(s) for s in self.datasets]
        return d


@dataclass
class TrainSummary:
    step: int
    """Steps completed by the run (all sessions)."""
    losses: list[tuple[int, float]]
    """(step, loss averaged over ranks) of every step of this session; step = steps completed."""
    checkpoint: Path | None
    """The last checkpoint written (or resumed from)."""
    seconds: float
    """Wall time of this session's steps (excludes setup)."""
    steps_per_second: float
    model_parameters: int
    world_size: int


# ----------------------------------------------------------------------------------- pieces
def learning_rate_factor(cfg: TrainConfig, step: int) -> float:
    """lr(step) / lr: linear warmup, then cosine to min_lr_ratio at `steps`."""
    return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of all randomness in step `step` on `rank`: a function of those alone."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return g


class StepBatches(Sampler[list[int]]):
    """Batch of global step s: positions [s*B, (s+1)*B) of this rank's stream of windows.

    The stream is epoch 0, 1, ... of `WindowSampler` (this rank's shard of a seeded order), each
    cut into whole batches (the tail that does not fill one is dropped). A function of the step
    alone, so resuming at step s needs no saved sampler state beyond s.
    """

    def __init__(self, sampler: WindowSampler, batch_size: int, first_step: int, last_step: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size
        self.first_step, self.last_step = first_step, last_step
        self.batches_per_epoch = len(sampler) // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"each rank gets {len(sampler)} windows per epoch, fewer than one batch of "
                f"{batch_size}: lower batch_size or window, or add data"
            )

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of global step `step`."""
        return divmod(step, self.batches_per_epoch)

    def __iter__(self):
        epoch_order, current = None, -1
        for step in range(self.first_step, self.last_step):
            epoch, batch = self.position(step)
            if epoch != current:
                self.sampler.set_epoch(epoch)
                epoch_order, current = list(self.sampler), epoch
            yield epoch_order[batch * self.batch_size : (batch + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.last_step - self.first_step


def model_config_for(cfg: TrainConfig, codec_config, action_space):
    """The ModelConfig of the run: preset + variant + overrides, with the latent shape taken from
    the codec and the action kind / count from the data (overrides may not contradict them)."""
    s = codec_config.latent_size
    derived: dict[str, Any] = {"latent_channels": codec_config.latent_channels, "latent_grid": [s, s]}
    if isinstance(action_space, gym.spaces.Discrete):
        derived.update(action_kind="discrete", n_actions=int(action_space.n), action_dim=0)
    elif isinstance(action_space, gym.spaces.Box):
        derived.update(action_kind="continuous", n_actions=0, action_dim=int(np.prod(action_space.shape)))
    else:
        raise ValueError(f"the world model takes Discrete or Box actions; the datasets have {action_space}")
    clash = sorted(
        k for k in derived if k in cfg.model_overrides and ckpt.config_diff({k: cfg.model_overrides[k]}, {k: derived[k]})
    )
    if clash:
        raise ValueError(
            f"model_overrides {clash} contradict the codec / data ("
            + ", ".join(f"{k}={derived[k]!r}" for k in clash) + "); drop them"
        )
    return make_config(cfg.preset, cfg.variant, **{**cfg.model_overrides, **derived})


def _check_resumable(sidecar: dict[str, Any], cfg: TrainConfig, codec, info: ddp.DistInfo, folder: Path) -> None:
    # Runs written before a key existed trained with the value the code then had.
    defaults = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, **LEGACY_TRAIN_DEFAULTS}
    diff = setting_differences(sidecar["train_config"], cfg.to_json(), RESUME_KEYS, legacy=defaults)
    if diff:
        raise ckpt.CheckpointError(f"cannot resume {folder}: " + "; ".join(diff) + " (start a new run folder to change them)")
    if not codec_matches(sidecar["codec"]["sha256"], codec, sidecar["codec"].get("path")):
        raise ckpt.CheckpointError(
            f"cannot resume {folder}: the codec {cfg.codec} is not the one the run was trained with "
            f"({sidecar['codec']['path']}): its encoder or latent stats differ"
        )
    if sidecar["world_size"] != info.world_size:
        log.warning(
            "resuming a run trained on %d ranks with %d: windows are sharded differently, so losses "
            "will not match an uninterrupted run", sidecar["world_size"], info.world_size,
        )


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------- samples
@torch.no_grad()
def rollout_samples(model, codec, batch: dict[str, torch.Tensor], context: int, denoise_steps: int, seed: int) -> torch.Tensor:
    """Open-loop rollout: real frames [0, context), then the model generates the rest of the window
    from the data's actions (a `RolloutSession`, seeded per stream). Returns uint8
    (N, 2, T, H, W, 3): the real window over the rollout, whose first `context` frames are the
    codec's reconstructions of the real ones.
    """
    frames = batch["frames"]  # (N, T, H, W, 3) uint8
    actions = batch["actions"]
    if model.cfg.action_kind == "continuous":
        actions = actions.flatten(2).float()  # (N, T, D)
    N, T = frames.shape[:2]
    was_training = model.training
    model.eval()
    session = RolloutSession(model, codec, batch=N, sampler_steps=denoise_steps)
    session.reset(frames[:, :context], actions[:, : context - 1], seeds=[seed + i for i in range(N)])
    device = session.device
    seen = codec.decode(codec.encode(frames[:, :context].to(device)), as_uint8=True)  # (N, context, H, W, 3)
    dreamed = [session.step(actions[:, t - 1]).frames.to(device) for t in range(context, T)]  # a_{t-1} led to t
    model.train(was_training)
    rollout = torch.cat([seen, *(f[:, None] for f in dreamed)], dim=1)  # (N, T, H, W, 3)
    return torch.stack([frames.to(device), rollout], dim=1).cpu()


def write_samples(videos: torch.Tensor, step: int, run_dir: Path, writer) -> None:
    """TensorBoard video if moviepy is there, else an image grid; always a PNG grid and a GIF in samples/."""
    N, _, T, H, W, C = videos.shape
    # Grid: per sample two rows (real, generated), time left to right. (2N H, T W, 3)
    grid = videos.permute(0, 1, 3, 2, 4, 5).reshape(N * 2 * H, T * W, C).numpy()
    folder = run_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(folder / f"step_{step:06d}.png")
    # GIF: each frame shows every sample's real and generated frame side by side. (T, N H, 2 W, 3)
    movie = videos.permute(2, 0, 3, 1, 4, 5).reshape(T, N * H, 2 * W, C).numpy()
    images = [Image.fromarray(f) for f in movie]
    images[0].save(folder / f"step_{step:06d}.gif", save_all=True, append_images=images[1:], duration=200, loop=0)
    if importlib.util.find_spec("moviepy") is not None:
        side_by_side = videos.permute(0, 2, 5, 3, 1, 4).reshape(N, T, C, H, 2 * W)  # (N, T, 3, H, 2W)
        writer.add_video("samples/real_vs_rollout", side_by_side, step, fps=5)
    else:
        writer.add_image("samples/real_over_rollout", grid, step, dataformats="HWC")


def fixed_sample_batch(dataset: WindowDataset, count: int) -> dict[str, torch.Tensor]:
    """`count` windows evenly spread over the dataset, the same at every sample step."""
    idx = np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int)
    items = [dataset[int(i)] for i in idx]
    return {k: torch.stack([item[k] for item in items]) for k in ("frames", "actions")}


def cached_latent_windows(cfg: TrainConfig, dataset: WindowDataset, codec, codec_sha: str, info: ddp.DistInfo):
    """The run's windows as latents from the cache in run_dir/latents, encoding what is missing
    first (each rank a share of the episodes; every rank waits for all of them)."""
    root = Path(cfg.run_dir) / latent_cache.CACHE_DIR
    folders, _ = latent_cache.build_latent_cache(
        dataset.stores, codec, codec_sha, root, rank=info.rank, world_size=info.world_size, progress=cfg.progress,
    )  # fmt: skip
    ddp.barrier(info)
    latent_cache.check_latent_cache(folders, dataset.stores, codec_sha, tuple(codec.config.latent_shape))
    if info.is_main:
        log.info("training on cached latents in %s", root / codec_sha[:16])
    return latent_cache.LatentWindowDataset(dataset, folders)


# ------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig) -> TrainSummary:
    """Train (or with cfg.resume, continue) a world-model run. Under torchrun, every rank calls this."""
    cfg.validate()
    info = ddp.init_distributed(cfg.device)
    try:
        return _train(cfg, info)
    except TrainingDiverged:
        # Every rank reached this verdict at the same step (the guard uses all-reduced values):
        # leave together, so that no rank is torn down by torchrun before it has reported.
        ddp.barrier(info)
        raise
    finally:
        ddp.shutdown(info)


def _resume(cfg: TrainConfig, info: ddp.DistInfo, codec, model, optimizer, scheduler, ema) -> ckpt.LoadedCheckpoint | None:
    """Load the run's newest checkpoint into the given objects (None for a new run), after checking
    that it may be continued with `cfg`; restores this rank's RNG streams."""
    run_dir = Path(cfg.run_dir)
    existing = ckpt.latest_checkpoint(run_dir)
    if existing is None:
        if cfg.resume:
            raise FileNotFoundError(f"nothing to resume: {run_dir / ckpt.LATEST_FILE} does not exist")
        return None
    if not cfg.resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass resume (--resume) to continue it, or pick a new folder")
    _check_resumable(ckpt.read_sidecar(existing), cfg, codec, info, existing)
    loaded = ckpt.load_checkpoint(
        existing, model=model, model_config=model.cfg.to_dict(), optimizer=optimizer, scheduler=scheduler, ema=ema
    )
    states = loaded.rng_states
    ckpt.restore_rng_state(states[info.rank] if info.rank < len(states) else states[0])
    if info.is_main:
        log.info("resumed %s at step %d", loaded.folder, loaded.step)
    return loaded


def _batch_on_device(batch: dict[str, torch.Tensor], model_cfg, codec, device: torch.device):
    """(latents (B, T, C, h, w), actions, rewards, terminations) of a loader batch, on `device`;
    frames are encoded by the frozen codec unless the batch comes from the latent cache."""
    actions = batch["actions"].to(device)
    if model_cfg.action_kind == "continuous":
        actions = actions.flatten(2).float()  # (B, T, D)
    if "latents" in batch:  # from the latent cache
        latents = batch["latents"].to(device, non_blocking=True)
    else:
        with torch.no_grad():  # (B, T, H, W, 3) uint8 -> (B, T, C, h, w)
            latents = codec.encode(batch["frames"].to(device, non_blocking=True))
    return latents, actions, batch["rewards"].to(device).float(), batch["terminations"].to(device)


def _train(cfg: TrainConfig, info: ddp.DistInfo) -> TrainSummary:
    device = info.device
    run_dir = Path(cfg.run_dir)
    if device.type != "cuda" and (cfg.bf16 or cfg.compile):
        log.info("bf16 / compile are CUDA-only options; ignored on %s", device)

    # -- data, codec, model ------------------------------------------------------------------
    dataset = WindowDataset(list(cfg.datasets), window=cfg.window)
    codec = load_codec(cfg.codec, device=device).requires_grad_(False)
    codec_cfg = codec.config
    size = (codec_cfg.image_size, codec_cfg.image_size, codec_cfg.image_channels)
    if tuple(dataset.frame_shape) != size:
        raise ValueError(f"dataset frames are {dataset.frame_shape}, the codec {cfg.codec} takes {size}")
    model_cfg = model_config_for(cfg, codec_cfg, dataset.action_space)
    codec_sha = codec_fingerprint(codec)

    torch.manual_seed(cfg.seed)  # the initial weights: the same on every rank
    model = WorldModel(model_cfg).to(device)
    if cfg.init_from and not cfg.resume:
        warm_start(model, cfg.init_from)
        if info.is_main:
            log.info("warm start from %s", cfg.init_from)
    ema = EMA(model, cfg.ema_decay)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(cfg, s))

    # -- resume --------------------------------------------------------------------------------
    loaded = _resume(cfg, info, codec, model, optimizer, scheduler, ema)
    step, last_ckpt = (loaded.step, loaded.folder) if loaded is not None else (0, None)
    end = cfg.steps if cfg.stop_after is None else cfg.stop_after
    if step >= end:
        log.info("run %s is already at step %d (target %d); nothing to do", run_dir, step, end)

    train_model = ddp.wrap_model(model, info, compile=cfg.compile and device.type == "cuda")

    # After the resume checks, so a refused run does not pay for the encoding pass first.
    train_data = cached_latent_windows(cfg, dataset, codec, codec_sha, info) if cfg.latent_cache else dataset
    sampler = WindowSampler(dataset, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    batches = StepBatches(sampler, cfg.batch_size, step, end)
    if loaded is not None:
        saved = loaded.sidecar
        if saved["world_size"] == info.world_size and saved["data"]["batches_per_epoch"] != batches.batches_per_epoch:
            raise ckpt.CheckpointError(
                f"cannot resume {last_ckpt}: the datasets now give {batches.batches_per_epoch} batches per "
                f"epoch, the run had {saved['data']['batches_per_epoch']} (the data changed)"
            )
    # A private generator: the loader draws its workers' base seed from it, not from the global
    # RNG, whose stream a resumed run must continue exactly where the checkpoint left it.
    loader = DataLoader(
        train_data, batch_sampler=batches, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )  # fmt: skip

    writer, bar, sample_batch = None, None, None
    if info.is_main:
        # Only the main process logs: the other ranks of a torchrun job never import TensorBoard.
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        # purge_step drops the events a killed session logged after its last checkpoint. Events
        # carry the number of completed steps, so the checkpoint's own step (logged before it was
        # saved) stays and the purge starts at the first step this session will log.
        writer = SummaryWriter(str(run_dir / "tb"), purge_step=step + 1 if step else None)
        bar = tqdm(total=end, initial=step, desc="world model", disable=not cfg.progress, dynamic_ncols=True)
        if cfg.sample_every:
            sample_batch = fixed_sample_batch(dataset, cfg.sample_count)
        log.info(
            "world model %s/%s: %d parameters, %d windows of %d frames, %d rank(s) on %s",
            cfg.preset, cfg.variant, model.num_parameters(), len(dataset), cfg.window, info.world_size, device,
        )

    def save(at: int) -> Path | None:
        states = ddp.gather_objects(ckpt.capture_rng_state(), info)  # collective: every rank
        folder = None
        if info.is_main:
            epoch, position = batches.position(at)
            extra = {
                "train_config": cfg.to_json(),
                "codec": {"path": str(resolve_checkpoint(cfg.codec).resolve()), "config": codec_cfg.to_dict(), "sha256": codec_sha},
                "sigma_data": model.sigma_data,
                "world_size": info.world_size,
                "data": {"epoch": epoch, "position": position, "batches_per_epoch": batches.batches_per_epoch},
                "last_loss": losses[-1][1] if losses else None,
            }
            folder = ckpt.save_checkpoint(
                run_dir, step=at, model=model, model_config=model_cfg.to_dict(), optimizer=optimizer,
                scheduler=scheduler, ema=ema, rng_states=states, extra=extra, keep=cfg.keep_checkpoints,
            )  # fmt: skip
        ddp.barrier(info)
        return folder

    def diverged(what: str, value: float) -> TrainingDiverged:  # raised on every rank at the same step
        return training.diverged(what, value, step + 1, last_ckpt, scheduler.get_last_lr()[0],
                                 stopped="training stopped on all ranks")

    forcing = ForcingConfig(p_mean=cfg.noise_mean, p_std=cfg.noise_std, p_long_context=cfg.p_long_context,
                            direct_noise=cfg.direct_noise, own_context=cfg.own_context,
                            noised_direct=cfg.noised_direct, min_sigma_after_prefix=cfg.min_sigma_after_prefix)
    losses: list[tuple[int, float]] = []
    t_start = time.perf_counter()
    t_log, step_log = t_start, step
    model.train()
    try:
        for batch in loader:
            latents, actions, rewards, terminations = _batch_on_device(batch, model_cfg, codec, device)
            generator = step_generator(cfg.seed, step, info.rank, device)
            with _autocast(cfg, device):
                loss, metrics = world_model_loss(train_model, latents, actions, rewards, terminations, generator=generator,
                                                 forcing_cfg=forcing)

            # Every rank sees the same mean: a NaN on one rank stops them all at this step.
            mean_loss = ddp.mean_across_ranks(loss, info)
            if not torch.isfinite(mean_loss):
                raise diverged("loss", mean_loss.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if not torch.isfinite(grad_norm):  # gradients are all-reduced: the same on every rank
                raise diverged("gradient norm", grad_norm.item())
            optimizer.step()
            scheduler.step()
            ema.update(model)
            step += 1
            losses.append((step, mean_loss.item()))

            if step % cfg.log_every == 0 or step == end:
                means = {
                    k: ddp.mean_across_ranks(torch.as_tensor(v, device=device), info).item()
                    for k, v in sorted(metrics.items()) if k != "loss"  # the loss is logged from mean_loss
                }
                if info.is_main:
                    now = time.perf_counter()
                    rate = (step - step_log) / max(now - t_log, 1e-9)
                    t_log, step_log = now, step
                    scalars = {"loss": losses[-1][1], **means, "lr": optimizer.param_groups[0]["lr"],
                               "grad_norm": grad_norm.item(), "steps_per_second": rate}
                    for k, v in scalars.items():
                        writer.add_scalar(f"train/{k}", v, step)
                    bar.set_postfix(loss=f"{losses[-1][1]:.4f}", steps_s=f"{rate:.2f}")
            if info.is_main:
                bar.update(1)
                if cfg.sample_every and step % cfg.sample_every == 0:
                    videos = rollout_samples(ema.module, codec, sample_batch, cfg.sample_context, cfg.sample_steps, cfg.seed)
                    write_samples(videos, step, run_dir, writer)
            if step % cfg.checkpoint_every == 0 or step == end:
                last_ckpt = save(step) or last_ckpt
                last_ckpt = ddp.broadcast_object(last_ckpt, info)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - t_start
    done = len(losses)
    return TrainSummary(
        step=step, losses=losses, checkpoint=last_ckpt, seconds=seconds,
        steps_per_second=done / seconds if seconds > 0 else 0.0,
        model_parameters=model.num_parameters(), world_size=info.world_size,
    )  # fmt: skip
