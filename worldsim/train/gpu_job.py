"""The GPU training job: one call on a lent GPU machine trains the bundled world model further.

    OUT=/some/folder python -m worldsim.train.gpu_job --pack runs/pack-mm9 --out "$OUT" --minutes 8
    bash scripts/device/train_gpu.sh            # the same, as the lent machine runs it (docs/gpu.md)

The machine has torch, numpy, OpenCV and safetensors but no gymnasium, minari, mujoco or pygame,
so this path reads a pack (`worldsim.data.pack`, made by `worldsim pack`) and imports nothing that
needs them (`FORBIDDEN_MODULES`; tests/test_gpu_job.py runs it with those imports blocked). In
particular it does not import `worldsim.train.trainer` (its data loader needs gymnasium); the
pieces it shares with the trainer (warm start, the codec fingerprint, AdamW groups) live in
`worldsim.train.weights`, which both import.

What one run does, in order, within `--minutes` of wall time (everything it measures goes to
$OUT/results.json, rewritten after each phase, so a run cut short still reports what it did):

1. Self-check (well under a minute; the CPU variants on a CPU): the chunked SSD scan against the
   token-by-token reference scan (values, final state, gradients); the frame-attention fast path
   (FlexAttention on CUDA, also in bf16; the chunked SDPA path on a CPU) against the dense
   reference, forward and backward; a tiny `WorldModel`'s parallel forward against its streaming
   steps; decoding one pack video; then, once the data and the model are loaded, one training
   step on a real batch (bf16 autocast on CUDA) with a finite loss and finite gradients that reach
   the new direct-path layer. A failed check stops the job (exit code 3) with a message naming it.
   Only the training step has fallbacks, because it fails by raising rather than by wrong
   numbers: if the bf16 step raises, the chunked SDPA attention is tried in bf16, then float32;
   the setup that ran is recorded.
2. Data: every pack video decoded (threads), every frame encoded once by the codec on the device;
   latents, actions, rewards and terminations stay on the device and windows are gathered there
   (no DataLoader). The last `--val-episodes` episodes are held out for a validation loss.
3. Model: the bundle's (`--init-from`, default the shipped bundle) model config plus
   `--prev-frames` (default 2: the direct path), its EMA weights copied in (the new layers keep
   their zero initialisation, so the model starts out computing exactly what the bundle does).
4. Training until the time budget: AdamW (fused on CUDA), EMA, bf16 autocast and torch.compile on
   CUDA (falling back to eager if compiling fails), linear warmup then a cosine decay over the
   remaining *time*. First, the SSD scan's chunk length is chosen by timing a training step at each
   of `SSM_CHUNK_CANDIDATES` on the device (`--ssm-chunk`). About every `--checkpoint-seconds` the EMA weights and config are exported to
   $OUT (format of `worldsim.train.checkpoint`: $OUT/latest.json + $OUT/checkpoints/step_N/ with
   checkpoint.json and ema.safetensors; `load_world_model($OUT)` loads it) and the held-out loss
   is measured. Throughput is reported as tokens/s and MFU, with the FLOPs of a step estimated as
   6 x parameters x tokens (forward + backward of every weight once per token; it leaves out the
   attention scores and the SSM scan, so the true MFU is somewhat higher).
5. Rollout benchmark of the trained EMA model: dreamed frames/s at batch 1, 64 and 1024
   (`RolloutSession` with the dream's sampler, frames decoded to pixels) and the single-stream
   latency per frame.

$OUT never holds more than 8 files (the lent machine returns at most 8): results.json, job.log,
latest.json and one checkpoint folder (two files), briefly two while the next one is written.
Exit codes: 0 done, 2 bad input (pack, bundle, arguments), 3 self-check failed, 4 training
diverged (the last good checkpoint is kept), 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open

from worldsim import bundled
from worldsim.codec.checkpoint import codec_fingerprint, load_codec
from worldsim.data.pack import PackError, open_pack, video_backend
from worldsim.diffusion.forcing import ForcingConfig
from worldsim.model import frame_attention as fa
from worldsim.model import ssd
from worldsim.model.blockwise_ssm import BlockwiseMamba2
from worldsim.model.config import VARIANTS, ModelConfig, make_config
from worldsim.model.loss import world_model_loss
from worldsim.model.ssd_reference import ssd_recurrent
from worldsim.model.world_model import WorldModel, parameter_count, widen_to_parameters
from worldsim.rollout.session import RolloutSession
from worldsim.train import checkpoint as ckpt
from worldsim.train import distributed, weights
from worldsim.train.distributed import TrainView
from worldsim.train.ema import EMA
from worldsim.train.weights import parameter_groups
from worldsim.utils.atomic import atomic_write_bytes, atomic_write_json, replace_dir
from worldsim.utils.safetensors_io import safetensors_bytes

log = logging.getLogger("worldsim.gpu_job")

FORMAT = "worldsim-gpu-job"
VERSION = 1
FORBIDDEN_MODULES = ("gymnasium", "gym", "minari", "mujoco", "memory_maze", "pygame", "stable_baselines3",
                     "dm_control")  # fmt: skip
"""Not installed on the lent GPU machine: nothing on this path may import them."""
RESULTS_FILE = "results.json"
LOG_FILE = "job.log"
MAX_OUT_FILE_BYTES = 15 * 2**20
"""The lent machine returns files of at most 16 MiB: a larger EMA file is exported in float16."""
PEAK_BF16_FLOPS = (  # dense bf16 tensor-core peak by device name (first match), for MFU
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A10", 125e12), ("L40", 181e12), ("L4", 121e12),
)  # fmt: skip


class SelfCheckFailed(RuntimeError):
    """A self-check found a wrong result; the message names the check."""


class JobInputError(ValueError):
    """Bad arguments, pack or bundle: the message names the problem (exit code 2)."""


# ------------------------------------------------------------------------------ config
@dataclass
class JobConfig:
    pack: str
    out: str
    minutes: float = 8.0
    init_from: str | None = None
    """Bundle or checkpoint to warm start from; None: the installed bundle; "none": from scratch."""
    codec: str | None = None
    """Codec checkpoint; default: the bundle's (--init-from a bundle) or the one a checkpoint records."""
    preset: str = "cpu"
    """Model preset when training from scratch (--init-from none)."""
    variant: str = "lssvwm"
    """Model variant when training from scratch (lssvwm or a baseline: causal_window, mamba_only...)."""
    equal_parameters: bool = False
    """From scratch, a baseline's MLPs are widened to the LSSVWM's parameter count of the same preset
    (`widen_to_parameters`): the comparison is at equal parameters as well as equal steps."""
    max_steps: int | None = None
    """Stop after this many steps even with time left (models compared at an equal budget); the
    learning-rate schedule then runs over these steps alone, so two runs that both reach them were
    trained alike however fast each ran (the time budget still stops a run that is too slow)."""
    prev_frames: int = 2
    window: int = 32
    """Frames per training window: the shipped model's (docs/gpu.md says why not 16)."""
    batch_size: int = 512
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    noise_mean: float = 0.3
    """ln(sigma) mean: DIAMOND's -0.4 at its sigma_data 0.5, moved to our unit-std latents (+ln 2); the bundle's recipe."""
    noise_std: float = 1.2
    p_long_context: float = 0.5
    direct_noise: float = 0.0
    """Noise augmentation of the direct path (`ForcingConfig.direct_noise`); 0 = off."""
    noised_direct: float = 0.0
    """Memory training: the direct path of frames after a clean prefix noised (`ForcingConfig.noised_direct`); 0 = off."""
    min_sigma_after_prefix: float = 0.0
    """Memory training: the frames after a clean prefix noised at least this much (`ForcingConfig.min_sigma_after_prefix`); 0 = off."""
    val_episodes: int = 2
    val_windows: int = 128
    checkpoint_seconds: float = 60.0
    bench_seconds: float = 60.0
    """Time kept at the end for the rollout benchmark (and the final checkpoint)."""
    bench_batches: tuple[int, ...] = (1, 64, 1024)
    bench_steps: int = 16
    bench_context: int = 9
    sampler_steps: int = 2
    device: str = "auto"
    bf16: bool = True
    compile: bool = True
    ssm_chunk: str = "auto"
    """SSD chunk length of the parallel scan: 'auto' times a training step at each of
    SSM_CHUNK_CANDIDATES on the device and keeps the fastest; or a number. Results do not depend on it."""
    threads: int | None = None
    decode_workers: int | None = None
    seed: int = 0
    peak_tflops: float | None = None
    work: str | None = None
    """Scratch folder for the full (resumable) checkpoints; default a temporary folder."""


def forcing_config(cfg: JobConfig) -> ForcingConfig:
    """The training noise of the job's settings (the training step, its check and validation)."""
    return ForcingConfig(cfg.noise_mean, cfg.noise_std, cfg.p_long_context, cfg.direct_noise, noised_direct=cfg.noised_direct,
                         min_sigma_after_prefix=cfg.min_sigma_after_prefix)


def parse_args(argv: list[str] | None = None) -> JobConfig:
    d = JobConfig(pack="", out="")
    p = argparse.ArgumentParser(prog="python -m worldsim.train.gpu_job", description=__doc__.split("\n\n")[0])
    p.add_argument("--pack", required=True, help="pack folder (`worldsim pack`)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="results folder (default $OUT)")
    p.add_argument("--minutes", type=float, default=d.minutes, help="wall-clock budget of the whole job")
    p.add_argument("--init-from", default=None, help="bundle / checkpoint to warm start from (default: the installed bundle; 'none': from scratch)")
    p.add_argument("--codec", default=None, help="codec checkpoint (default: the bundle's)")
    p.add_argument("--preset", default=d.preset, help="model preset when training from scratch")
    p.add_argument("--variant", default=d.variant, choices=VARIANTS, help="model variant when training from scratch (--init-from none)")
    p.add_argument("--equal-parameters", action="store_true", help="from scratch: widen a baseline's MLPs to the LSSVWM's parameter count")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after this many steps (equal-budget comparisons)")
    p.add_argument("--prev-frames", type=int, default=d.prev_frames, help="direct-path frames added to the bundle's config")
    p.add_argument("--window", type=int, default=d.window)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per step (halved on out-of-memory)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--noise-mean", type=float, default=d.noise_mean)
    p.add_argument("--noise-std", type=float, default=d.noise_std)
    p.add_argument("--p-long-context", type=float, default=d.p_long_context)
    p.add_argument("--direct-noise", type=float, default=d.direct_noise, help="direct-path noise augmentation: per-frame std in [0, this]")
    p.add_argument("--min-sigma-after-prefix", type=float, default=d.min_sigma_after_prefix, help="noise level the frames after a clean prefix are kept above (memory training; 0 = off)")
    p.add_argument("--noised-direct", type=float, default=d.noised_direct, help="probability per window with a clean prefix that the direct path shows the frames after it noised (memory training)")
    p.add_argument("--val-episodes", type=int, default=d.val_episodes, help="last pack episodes held out for a validation loss")
    p.add_argument("--val-windows", type=int, default=d.val_windows)
    p.add_argument("--checkpoint-seconds", type=float, default=d.checkpoint_seconds)
    p.add_argument("--bench-seconds", type=float, default=d.bench_seconds, help="time kept for the rollout benchmark")
    p.add_argument("--bench-batches", default=",".join(map(str, d.bench_batches)))
    p.add_argument("--bench-steps", type=int, default=d.bench_steps)
    p.add_argument("--sampler-steps", type=int, default=d.sampler_steps)
    p.add_argument("--device", default=d.device, choices=["auto", "cuda", "cpu"])
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 training on CUDA")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    p.add_argument("--ssm-chunk", default=d.ssm_chunk, help="SSD chunk length: 'auto' (timed on the device) or a number")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--decode-workers", type=int, default=None, help="threads decoding videos")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak bf16 TFLOP/s for MFU (default: by name)")
    p.add_argument("--work", default=None, help="scratch folder for full checkpoints")
    a = p.parse_args(argv)
    if not a.out:
        p.error("--out is required (or set $OUT)")
    try:
        batches = tuple(int(b) for b in a.bench_batches.split(",") if b.strip())
    except ValueError:
        p.error(f"--bench-batches must be comma-separated integers, got {a.bench_batches!r}")
    values = {k: v for k, v in vars(a).items() if k != "bench_batches"}
    cfg = JobConfig(**values, bench_batches=batches)
    problems = [f"{k} must be >= {lo}" for k, lo in (("window", 3), ("batch_size", 1), ("warmup_steps", 1),
                ("bench_steps", 1), ("sampler_steps", 1), ("val_episodes", 0), ("val_windows", 1), ("max_steps", 1))
                if getattr(cfg, k) is not None and getattr(cfg, k) < lo]  # fmt: skip
    if cfg.equal_parameters and cfg.init_from != "none":
        problems.append("--equal-parameters needs --init-from none (a warm start keeps its model's size)")
    if cfg.minutes <= 0 or cfg.checkpoint_seconds <= 0:
        problems.append("minutes and checkpoint_seconds must be > 0")
    if not (0 <= cfg.min_sigma_after_prefix and math.isfinite(cfg.min_sigma_after_prefix)):
        problems.append(f"min_sigma_after_prefix must be a finite number >= 0, got {cfg.min_sigma_after_prefix}")
    if not 0 <= cfg.noised_direct <= 1:
        problems.append(f"noised_direct must be a probability in [0, 1], got {cfg.noised_direct}")
    if not (cfg.direct_noise >= 0 and math.isfinite(cfg.direct_noise)):
        problems.append(f"direct_noise must be a finite number >= 0, got {cfg.direct_noise}")
    if cfg.ssm_chunk != "auto" and not (cfg.ssm_chunk.isdigit() and int(cfg.ssm_chunk) >= 1):
        problems.append(f"ssm_chunk must be 'auto' or a positive integer, got {cfg.ssm_chunk!r}")
    if problems:
        p.error("; ".join(problems))
    return cfg


# ------------------------------------------------------------------------------ results + log
class Job:
    """The results dict, rewritten atomically to $OUT/results.json whenever a phase ends."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + cfg.minutes * 60
        self.results: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "status": "starting",
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": dataclasses.asdict(cfg),
        }  # fmt: skip

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def write(self) -> None:
        self.results["seconds"] = round(self.elapsed(), 2)
        self.results["forbidden_modules_loaded"] = forbidden_modules_loaded()
        atomic_write_json(self.out / RESULTS_FILE, self.results)


def forbidden_modules_loaded() -> list[str]:
    """FORBIDDEN_MODULES imported into this process (a blocked name maps to None: not loaded)."""
    return sorted(m for m in FORBIDDEN_MODULES if sys.modules.get(m) is not None)


def setup_logging(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in [h for h in root.handlers if getattr(h, "_gpu_job", False)]:  # a second run in one process
        root.removeHandler(handler)
        handler.close()
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(out / LOG_FILE, mode="w")):
        handler.setFormatter(fmt)
        handler._gpu_job = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def resolve_device(name: str) -> torch.device:
    """`worldsim.train.distributed.resolve_device`, with its refusal as the job's input error."""
    try:
        return distributed.resolve_device(name)
    except ValueError as e:
        raise JobInputError(f"--device {name}: {e}") from None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "python": sys.version.split()[0],
                            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    capability=list(torch.cuda.get_device_capability(device)),
                    memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    else:
        info["name"] = "cpu"
    return info


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU: MFU not reported"
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops, f"dense bf16 peak of {key} (datasheet, no sparsity)"
    return None, f"unknown peak for {name!r}: pass --peak-tflops"


# ------------------------------------------------------------------------------ shared with the trainer
def load_source_model(source: str):
    """(WorldModel, model config dict) of a bundle or a checkpoint / run folder (EMA weights)."""
    try:
        model = weights.load_source_model(source)
    except (ValueError, FileNotFoundError) as e:  # BundleError / CheckpointError are ValueErrors
        raise JobInputError(f"--init-from {source}: {e}") from None
    return model, model.cfg.to_dict()


def warm_start(model, loaded) -> dict[str, Any]:
    """`weights.copy_weights` with the job's input error."""
    try:
        return weights.copy_weights(model, loaded)
    except ValueError as e:
        raise JobInputError(str(e)) from None


# ------------------------------------------------------------------------------ FlexAttention under autocast
def harmonize_flex_dtypes() -> None:
    """Under CUDA autocast nn.RMSNorm returns float32, so the attention's normed and rotated q, k
    arrive in float32 next to a bf16 v. SDPA casts its inputs to the autocast dtype; FlexAttention
    (torch <= 2.11) refuses mixed dtypes instead. This wraps `frame_attention.flex_frame_attention`
    so that under autocast it gets what SDPA would: q, k, v in the autocast dtype. A no-op outside
    autocast (inference, the self-check's float32 comparisons) and when the dtypes already agree."""
    if getattr(fa.flex_frame_attention, "_harmonized", False):
        return
    inner = fa.flex_frame_attention

    def flex_frame_attention(q, k, v, tokens_per_frame, window, compiled=True):
        if q.is_cuda and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return inner(q, k, v, tokens_per_frame, window, compiled)

    flex_frame_attention._harmonized = True  # type: ignore[attr-defined]
    fa.flex_frame_attention = flex_frame_attention


# ------------------------------------------------------------------------------ self-check
@dataclass
class Check:
    name: str
    ok: bool
    error: float | None = None
    tol: float | None = None
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    message: str = ""


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (in float64)."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _worst(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, dict[str, float]]:
    errs = {k: _rel_err(a, b) for k, (a, b) in pairs.items()}
    return max(errs.values()), errs


def check_ssd(device: torch.device) -> Check:
    """Chunked SSD scan (the path `ssd_chunked` takes here) vs the token-by-token recurrence."""
    g = torch.Generator().manual_seed(0)
    b, L, h, p, n = 2, (300 if device.type == "cuda" else 100), 4, 32, 16
    x = torch.randn(b, L, h, p, generator=g, dtype=torch.float64)
    dt_ = torch.nn.functional.softplus(torch.randn(b, L, h, generator=g, dtype=torch.float64) - 1)
    A = -torch.exp(torch.randn(h, generator=g, dtype=torch.float64) * 0.5)
    B = torch.randn(b, L, 1, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, L, 1, n, generator=g, dtype=torch.float64)
    h0 = torch.randn(b, h, p, n, generator=g, dtype=torch.float64) * 0.1
    w = torch.randn(b, L, h, p, generator=g, dtype=torch.float64)  # a random cotangent

    xr = x.clone().requires_grad_(True)
    y_ref, s_ref = ssd_recurrent(xr, dt_, A, B, C, h0)
    (y_ref * w).sum().backward()

    xf = x.to(device, torch.float32).requires_grad_(True)
    args = [t.to(device, torch.float32) for t in (dt_, A, B, C)]
    chunk = ssd.default_chunk_size(xf)
    y, s = ssd.ssd_chunked(xf, *args, chunk, h0.to(device, torch.float32), backend="auto")
    (y * w.to(device, torch.float32)).sum().backward()
    worst, errs = _worst({"y": (y, y_ref), "final_state": (s, s_ref), "grad_x": (xf.grad, xr.grad)})
    tol = 1e-4
    return Check("ssd_scan", worst <= tol, worst, tol, detail={
        "backend": ssd.resolve_backend(xf), "chunk": chunk, "length": L, "errors": errs})


def check_attention(device: torch.device) -> Check:
    """Frame-local attention: the fast path `auto` picks here vs the dense masked reference,
    forward and backward, with 8 cached frames before 24 query frames (window 9)."""
    g = torch.Generator().manual_seed(1)
    B, H, D, N, Tq, P, window = 2, 4, 32, 16, 24, 8, 9
    q = torch.randn(B, H, Tq * N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, (P + Tq) * N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, (P + Tq) * N, D, generator=g, dtype=torch.float64)
    w = torch.randn(B, H, Tq * N, D, generator=g, dtype=torch.float64)

    def run(fn, dtype, dev):
        ts = [t.detach().to(dev, dtype).clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*ts, N, window)
        (out.float() * w.to(dev, torch.float32)).sum().backward()
        return out, *(t.grad for t in ts)

    ref = run(fa.dense_frame_attention, torch.float64, torch.device("cpu"))
    name = fa.resolve_backend("auto", device, needs_grad=True)
    fast = fa.flex_frame_attention if name == "flex" else fa.chunked_frame_attention
    names = ("out", "grad_q", "grad_k", "grad_v")
    worst, errs = _worst(dict(zip(names, zip(run(fast, torch.float32, device), ref))))
    tol = 2e-3 if device.type == "cuda" else 1e-5
    detail: dict[str, Any] = {"backend": name, "float32_errors": errs}
    ok = worst <= tol
    if device.type == "cuda":  # the training dtype too, against a looser bound
        worst16, errs16 = _worst(dict(zip(names, zip(run(fast, torch.bfloat16, device), ref))))
        detail["bf16_errors"], detail["bf16_tol"] = errs16, 5e-2
        ok = ok and worst16 <= 5e-2
    return Check("frame_attention", ok, worst, tol, detail=detail)


def check_streaming(device: torch.device) -> Check:
    """A tiny WorldModel (direct path on, perturbed zero-initialised layers): the parallel forward
    over 8 frames equals 8 streaming steps (the dream loop)."""
    cfg = make_config("tiny", latent_channels=4, latent_grid=(8, 8), attn_window=3, ssm_chunk_size=8, prev_frames=2)
    torch.manual_seed(0)
    model = WorldModel(cfg)
    with torch.no_grad():
        for prm in model.parameters():
            if (prm == 0).all():
                prm.normal_(0, 0.2)
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(2)
    Bn, T = 2, 8
    x = torch.randn(Bn, T, 4, 8, 8, generator=g)
    sigma = torch.rand(Bn, T, generator=g) * 3
    sigma[:, ::3] = 0
    actions = torch.randint(0, cfg.n_actions + 1, (Bn, T), generator=g)
    x, sigma, actions = x.to(device), sigma.to(device), actions.to(device)
    with torch.no_grad():
        par = model(x, sigma, actions)
        cache = model.allocate_cache(Bn)
        steps = [model.step(x[:, t], sigma[:, t], actions[:, t], cache) for t in range(T)]
    stream = {f: torch.stack([getattr(s, f) for s in steps], 1) for f in ("denoised", "reward", "termination_logit")}
    worst, errs = _worst({f: (stream[f], getattr(par, f)) for f in stream})
    tol = 1e-3 if device.type == "cuda" else 1e-4
    return Check("parallel_vs_streaming", worst <= tol, worst, tol, detail={"errors": errs, "frames": T})


def check_video(pack) -> Check:
    """Decode the first pack video: the manifest's frame count and shape."""
    t = time.perf_counter()
    try:
        frames = pack.frames(0)
    except PackError as e:
        return Check("pack_video", False, message=str(e))
    s = time.perf_counter() - t
    return Check("pack_video", True, detail={"backend": video_backend(), "frames": len(frames),
                                             "shape": list(frames.shape[1:]), "frames_per_s": round(len(frames) / max(s, 1e-9))})


def run_check(fn: Callable[[], Check], name: str) -> Check:
    t = time.perf_counter()
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported with its cause
        result = Check(name, False, message=f"{type(e).__name__}: {e}",
                       detail={"traceback": traceback.format_exc(limit=6)})
    result.seconds = round(time.perf_counter() - t, 3)
    state = "ok" if result.ok else "FAILED"
    err = "" if result.error is None else f" (max rel. error {result.error:.2e}, tol {result.tol:.0e})"
    log.info("self-check %-22s %s%s %.1f s %s", result.name, state, err, result.seconds, result.message)
    return result


def kernel_checks(device: torch.device, pack=None) -> list[Check]:
    """The checks that need no training data: SSD, attention, streaming, (one pack video)."""
    checks = [run_check(lambda: check_ssd(device), "ssd_scan"),
              run_check(lambda: check_attention(device), "frame_attention"),
              run_check(lambda: check_streaming(device), "parallel_vs_streaming")]
    if pack is not None:
        checks.append(run_check(lambda: check_video(pack), "pack_video"))
    return checks


def raise_if_failed(checks: list[Check]) -> None:
    failed = [c for c in checks if not c.ok]
    if failed:
        parts = []
        for c in failed:
            why = c.message or f"max relative error {c.error:.3g} > tolerance {c.tol:.0e}"
            parts.append(f"{c.name}: {why}")
        raise SelfCheckFailed("self-check failed: " + "; ".join(parts))


# ------------------------------------------------------------------------------ data on the device
@dataclass
class DeviceData:
    latents: torch.Tensor  # (F, C, h, w) float32
    actions: torch.Tensor  # (F,) int64 | (F, *shape) float32
    rewards: torch.Tensor  # (F,) float32
    terminations: torch.Tensor  # (F,) bool
    train_starts: torch.Tensor  # (n,) int64: first row of each training window
    val_starts: torch.Tensor  # (m,) int64
    window: int
    clip: tuple[np.ndarray, np.ndarray]  # a real context clip: frames (K, H, W, 3) uint8, actions (K - 1,)
    stats: dict[str, Any]

    def batch(self, starts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Windows beginning at rows `starts` (B,): latents (B, T, C, h, w), actions, rewards, terminations."""
        rows = starts[:, None] + torch.arange(self.window, device=starts.device)  # (B, T)
        return self.latents[rows], self.actions[rows], self.rewards[rows], self.terminations[rows]


def window_starts(pack, episodes: range, window: int) -> np.ndarray:
    parts = [pack.offsets[i] + np.arange(pack.episode_steps[i] - window + 1) for i in episodes
             if pack.episode_steps[i] >= window]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


@torch.no_grad()
def load_device_data(pack, codec, device: torch.device, cfg: JobConfig) -> DeviceData:
    t = time.perf_counter()
    frames = pack.all_frames(workers=cfg.decode_workers)  # (F, H, W, 3) uint8
    t_decode = time.perf_counter() - t
    t = time.perf_counter()
    chunk = 4096 if device.type == "cuda" else 256
    latents = torch.cat([codec.encode(torch.from_numpy(frames[i : i + chunk]).to(device)).float()
                         for i in range(0, len(frames), chunk)]).contiguous()  # (F, C, h, w)
    sync(device)
    t_encode = time.perf_counter() - t
    n = len(pack)
    val = min(cfg.val_episodes, max(0, n - 1))
    if val != cfg.val_episodes:
        log.info("the pack has %d episodes: holding out %d for validation, not %d", n, val, cfg.val_episodes)
    train_eps, val_eps = range(n - val), range(n - val, n)
    train = window_starts(pack, train_eps, cfg.window)
    held = window_starts(pack, val_eps, cfg.window)
    if len(train) == 0:
        raise JobInputError(f"{pack.path}: no training episode has {cfg.window} steps for one window")
    if len(held) > cfg.val_windows:
        held = held[np.linspace(0, len(held) - 1, cfg.val_windows).round().astype(int)]
    space = pack.action_space
    actions = np.asarray(pack.actions)
    actions = torch.from_numpy(actions.astype(np.int64 if space["type"] == "discrete" else np.float32))
    K = cfg.bench_context
    ep = n - 1 if pack.episode_steps[-1] >= K else int(np.argmax(pack.episode_steps))
    o = int(pack.offsets[ep])
    clip_len = min(K, int(pack.episode_steps[ep]))
    clip_actions = np.asarray(pack.actions[o : o + clip_len - 1])
    clip = (frames[o : o + clip_len].copy(), clip_actions.astype(np.int64 if space["type"] == "discrete" else np.float32))
    stats = {"episodes": n, "train_episodes": len(train_eps), "val_episodes": len(val_eps),
             "frames": int(len(frames)), "train_windows": int(len(train)), "val_windows": int(len(held)),
             "decode_seconds": round(t_decode, 2), "decode_frames_per_s": round(len(frames) / max(t_decode, 1e-9)),
             "encode_seconds": round(t_encode, 2), "encode_frames_per_s": round(len(frames) / max(t_encode, 1e-9)),
             "latent_std": float(latents.std()), "latent_mean": float(latents.mean())}
    return DeviceData(
        latents=latents, actions=actions.to(device), rewards=torch.from_numpy(np.array(pack.rewards, np.float32)).to(device),
        terminations=torch.from_numpy(np.array(pack.terminations, bool)).to(device),
        train_starts=torch.from_numpy(train).to(device), val_starts=torch.from_numpy(held).to(device),
        window=cfg.window, clip=clip, stats=stats,
    )  # fmt: skip


# ------------------------------------------------------------------------------ model
def load_codec_for(cfg: JobConfig, init_from: str | None):
    path = cfg.codec
    if path is None and init_from is not None:
        if bundled.is_bundle(init_from):
            path = init_from
        else:
            try:
                path = (ckpt.read_sidecar(init_from).get("codec") or {}).get("path")
            except ValueError as e:
                raise JobInputError(f"--init-from {init_from}: {e}") from None
    if path is None:
        raise JobInputError("no codec: pass --codec (or --init-from a bundle, which holds its codec)")
    try:
        codec = load_codec(path)
    except (ValueError, FileNotFoundError) as e:
        raise JobInputError(f"codec {path}: {e}") from None
    # Recorded in the checkpoint: relative to the repository when inside it, so that the same
    # path works on the machine the checkpoint is brought back to.
    with contextlib.suppress(ValueError):
        path = Path(path).resolve().relative_to(Path.cwd().resolve())
    return codec, str(path)


def build_model(cfg: JobConfig, init_from: str | None, codec_config, space: dict[str, Any]):
    """(WorldModel with the warm-start weights, warm-start report)."""
    derived: dict[str, Any] = {"latent_channels": codec_config.latent_channels,
                               "latent_grid": [codec_config.latent_size] * 2}
    if space["type"] == "discrete":
        derived.update(action_kind="discrete", n_actions=int(space["n"]), action_dim=0)
    else:
        derived.update(action_kind="continuous", n_actions=0, action_dim=int(np.prod(space["shape"])))
    loaded = None
    if init_from is not None:
        loaded, source_cfg = load_source_model(init_from)
        clash = {k: (source_cfg[k], v) for k, v in derived.items() if json.dumps(source_cfg[k]) != json.dumps(v)}
        if clash:
            raise JobInputError(f"--init-from {init_from} does not fit the pack / codec: " + "; ".join(
                f"{k}: {a!r} in the model, {b!r} from the data" for k, (a, b) in clash.items()))
        if cfg.variant != source_cfg.get("variant", "lssvwm"):
            raise JobInputError(f"--variant {cfg.variant}: --init-from {init_from} is a {source_cfg.get('variant')} "
                                "model; a variant is chosen when training from scratch (--init-from none)")
        model_cfg = ModelConfig.from_dict({**source_cfg, "prev_frames": cfg.prev_frames})
    else:
        model_cfg = make_config(cfg.preset, variant=cfg.variant, prev_frames=cfg.prev_frames, **derived)
        if cfg.equal_parameters:
            reference = make_config(cfg.preset, variant="lssvwm", prev_frames=cfg.prev_frames, **derived)
            model_cfg = widen_to_parameters(model_cfg, parameter_count(reference))
    torch.manual_seed(cfg.seed)
    model = WorldModel(model_cfg, sigma_data=1.0 if loaded is None else loaded.sigma_data)
    report: dict[str, Any] = {"source": init_from}
    if loaded is not None:
        report.update(warm_start(model, loaded))
    return model, report


# ------------------------------------------------------------------------------ training step
def autocast_ctx(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_attention_backend(model, backend: str) -> None:
    """Pick the attention kernel of every layer (a kernel choice: the weights compute the same)."""
    for m in model.modules():
        if m.__class__.__name__ == "FrameLocalAttention":
            m.backend = backend


def check_train_step(model, data: DeviceData, device: torch.device, cfg: JobConfig) -> tuple[Check, dict[str, Any]]:
    """One training step's forward + backward on a real batch in the setup training will use:
    finite loss, finite gradients, and a gradient on the new direct-path layer. On CUDA a setup
    that raises is replaced by the next: bf16 + FlexAttention, bf16 + chunked SDPA, float32 (same two)."""
    setups = [{"bf16": cfg.bf16 and device.type == "cuda", "attn_backend": "auto"}]
    if device.type == "cuda":
        setups += [{"bf16": True, "attn_backend": "chunked"}, {"bf16": False, "attn_backend": "auto"},
                   {"bf16": False, "attn_backend": "chunked"}]
        setups = [s for i, s in enumerate(setups) if s not in setups[:i] and (cfg.bf16 or not s["bf16"])]
    # Every window with a clean prefix, so the reward and termination heads are in the loss: from
    # scratch the denoiser's output layer starts at zero and passes no gradient back, and the heads
    # are then the only way a gradient reaches the direct path (a batch of windows without a
    # prefix, 1 in 4 at two windows, failed the check with nothing wrong).
    forcing = dataclasses.replace(forcing_config(cfg), p_long_context=1.0)
    g = torch.Generator(device=device).manual_seed(cfg.seed + 17)
    starts = data.train_starts[torch.randint(len(data.train_starts), (min(8, cfg.batch_size),), generator=g, device=device)]
    latents, actions, rewards, terms = data.batch(starts)
    if model.cfg.action_kind == "continuous":
        actions = actions.flatten(2).float()
    tried = []
    for setup in setups:
        set_attention_backend(model, setup["attn_backend"])
        model.zero_grad(set_to_none=True)
        try:
            with autocast_ctx(device, setup["bf16"]):
                loss, stats = world_model_loss(model, latents, actions, rewards, terms, generator=g, forcing_cfg=forcing)
            loss.backward()
        except Exception as e:  # noqa: BLE001 - try the next setup, keep the reason
            tried.append({**setup, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            log.warning("training step with %s raised %s: %s", setup, type(e).__name__, str(e)[:400])
            continue
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(n for n, gr in grads.items() if gr is None)
        nonfinite = sorted(n for n, gr in grads.items() if gr is not None and not torch.isfinite(gr).all())
        prev = model.net.prev_in
        prev_norm = None if prev is None or prev.weight.grad is None else float(prev.weight.grad.norm())
        ok = math.isfinite(stats["loss"]) and not nonfinite and (prev is None or (prev_norm or 0) > 0)
        detail = {**setup, "loss": stats["loss"], "grad_norm": float(torch.sqrt(sum(gr.float().square().sum() for gr in grads.values() if gr is not None))),
                  "no_grad": missing[:5], "nonfinite_grads": nonfinite[:5], "prev_in_grad_norm": prev_norm, "tried": tried}  # fmt: skip
        model.zero_grad(set_to_none=True)
        if ok:
            return Check("train_step", True, detail=detail), setup
        tried.append({**setup, "error": f"loss {stats['loss']}, non-finite gradients {nonfinite[:3]}, prev_in grad {prev_norm}"})
    model.zero_grad(set_to_none=True)
    why = "; ".join(f"{t['bf16'] and 'bf16' or 'float32'} + {t['attn_backend']}: {t['error']}" for t in tried)
    return Check("train_step", False, message=why, detail={"tried": tried}), setups[0]


# ------------------------------------------------------------------------------ checkpoints
def export_checkpoint(folder: Path, out: Path) -> Path:
    """Copy a full checkpoint's sidecar and EMA weights to $OUT/checkpoints/<name>/ (float16 if
    the float32 file would exceed what the lent machine returns), point $OUT/latest.json at it,
    then delete older exported checkpoints. A kill at any moment leaves latest.json pointing at
    a complete folder."""
    root = out / ckpt.CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    src = folder / ckpt.EMA_FILE
    if src.stat().st_size <= MAX_OUT_FILE_BYTES:
        shutil.copy2(src, tmp / ckpt.EMA_FILE)
    else:
        with safe_open(str(src), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: (t.half() if t.is_floating_point() else t) for k in f.keys() for t in [f.get_tensor(k)]}
        atomic_write_bytes(tmp / ckpt.EMA_FILE, safetensors_bytes(tensors, metadata={**meta, "stored_dtype": "float16"}))
    shutil.copy2(folder / ckpt.SIDECAR_FILE, tmp / ckpt.SIDECAR_FILE)  # last: marks a whole folder
    final = root / folder.name
    replace_dir(tmp, final)
    atomic_write_json(out / ckpt.LATEST_FILE, {"step": int(folder.name.split("_")[1]), "checkpoint": f"{ckpt.CHECKPOINTS_DIR}/{final.name}"})
    for old in root.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------ the run
def downsample(rows: list, limit: int = 1500) -> list:
    if len(rows) <= limit:
        return rows
    idx = np.linspace(0, len(rows) - 1, limit).round().astype(int)
    return [rows[i] for i in sorted(set(idx.tolist()))]


@torch.no_grad()
def validation_loss(module, data: DeviceData, device: torch.device, cfg: JobConfig, bf16: bool) -> float | None:
    """Loss of `module` on the held-out windows with fixed noise (the same at every call)."""
    if len(data.val_starts) == 0:
        return None
    forcing = forcing_config(cfg)
    g = torch.Generator(device=device).manual_seed(cfg.seed + 99)
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    for i in range(0, len(data.val_starts), 64):
        starts = data.val_starts[i : i + 64]
        latents, actions, rewards, terms = data.batch(starts)
        if module.cfg.action_kind == "continuous":
            actions = actions.flatten(2).float()
        with autocast_ctx(device, bf16):
            _, stats = world_model_loss(module, latents, actions, rewards, terms, generator=g, forcing_cfg=forcing)
        total += stats["loss"] * len(starts)
        count += len(starts)
    module.train(was_training)
    return total / count


SSM_CHUNK_CANDIDATES = (32, 64, 128, 256)
"""Chunk lengths `--ssm-chunk auto` tries. The pure-PyTorch SSD materialises a (Q x Q) decay and
score matrix per head and chunk, so its within-chunk work grows with Q while the pass across
chunks shrinks; Mamba2's 256 suits its fused kernel, and on the CPU 32 was fastest. The first GPU
leases ran the PyTorch path at 256 (MFU 1.2-1.4%, as many tokens/s at batch 1024 as at 256)."""


def set_ssm_chunk(model: WorldModel, chunk: int | None) -> None:
    """Set the parallel scan's chunk length on every SSM layer (None: the device's default)."""
    for module in model.modules():
        if isinstance(module, BlockwiseMamba2):
            module.chunk_size = chunk


def choose_ssm_chunk(model: WorldModel, data: DeviceData, device: torch.device, cfg: JobConfig, bf16: bool,
                     batch: int, forcing: ForcingConfig, timed_steps: int = 3) -> dict[str, Any]:
    """Set the SSD chunk length from `cfg.ssm_chunk`; with 'auto', the one whose training step
    (forward + backward on a real batch, no optimizer step) runs fastest here. Returns what was
    chosen and the median step time in ms of each candidate."""
    if not any(isinstance(m, BlockwiseMamba2) for m in model.modules()):
        return {"chosen": None, "why": "no SSM layers"}
    if cfg.ssm_chunk != "auto":
        set_ssm_chunk(model, int(cfg.ssm_chunk))
        return {"chosen": int(cfg.ssm_chunk), "why": "asked"}
    g = torch.Generator(device=device).manual_seed(cfg.seed + 7)
    latents, actions, rewards, terms = data.batch(data.train_starts[:batch])
    if model.cfg.action_kind == "continuous":
        actions = actions.flatten(2).float()
    times: dict[int, float] = {}
    for chunk in SSM_CHUNK_CANDIDATES:
        set_ssm_chunk(model, chunk)
        runs = []
        try:
            for i in range(timed_steps + 1):  # the first run warms up (allocator, kernel selection)
                sync(device)
                t = time.perf_counter()
                with autocast_ctx(device, bf16):
                    loss, _ = world_model_loss(model, latents, actions, rewards, terms, generator=g, forcing_cfg=forcing)
                loss.backward()
                sync(device)
                if i:
                    runs.append(time.perf_counter() - t)
        except torch.cuda.OutOfMemoryError:
            runs = [math.inf]  # the training loop halves the batch if the chosen one runs out too
            torch.cuda.empty_cache()
        model.zero_grad(set_to_none=True)
        times[chunk] = 1000 * statistics.median(runs)
    best = min(times, key=times.get)
    set_ssm_chunk(model, best)
    log.info("SSD chunk length %d (training step ms by chunk: %s)", best,
             ", ".join(f"{c}: {ms:.1f}" for c, ms in times.items()))
    return {"chosen": best, "why": "fastest training step", "step_ms": {str(c): (round(ms, 2) if math.isfinite(ms) else None) for c, ms in times.items()}}


def train(job: Job, model, codec, codec_path: str, data: DeviceData, device: torch.device, setup: dict[str, Any],
          work: Path) -> dict[str, Any]:
    """Train until the budget; returns the training report (also kept in job.results["train"])."""
    cfg = job.cfg
    bf16 = setup["bf16"]
    forcing = forcing_config(cfg)
    model.train()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, fused=fused)
    ema = EMA(model, cfg.ema_decay)
    params = model.num_parameters()
    T, N = cfg.window, model.cfg.tokens_per_frame
    batch = cfg.batch_size
    peak, peak_note = peak_flops(device, cfg.peak_tflops)
    codec_sha = codec_fingerprint(codec)
    report: dict[str, Any] = {
        "setup": setup, "parameters": params, "batch_size": batch, "window": T, "tokens_per_frame": N,
        "flops_estimate": "6 x parameters x tokens per step (attention scores and SSM scans not counted)",
        "peak_flops": peak, "peak_flops_source": peak_note, "steps": 0, "loss_curve": [], "val_curve": [],
        "checkpoints": [], "compile": {"asked": cfg.compile and device.type == "cuda"}, "oom_halvings": 0,
    }  # fmt: skip
    job.results["train"] = report

    report["ssm_chunk"] = choose_ssm_chunk(model, data, device, cfg, bf16, batch, forcing)
    if report["ssm_chunk"]["chosen"] is not None:
        set_ssm_chunk(ema.module, report["ssm_chunk"]["chosen"])  # validation and the benchmark alike
    call: Any = model
    if report["compile"]["asked"]:
        # Static shapes: every training step has the same shape, and on the H100 (torch 2.11) the
        # dynamic-shape recompile Dynamo tries after a second shape failed in Inductor's scan codegen.
        call = torch.compile(model, dynamic=False)
    view = TrainView(model, call)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    losses: list[list[float]] = []
    step, last_save = 0, time.perf_counter()
    train_end = job.deadline - cfg.bench_seconds
    t_start = time.perf_counter()
    steady_from: tuple[int, float] | None = None  # (step, time) where steady throughput starts
    paused = [0.0]  # seconds spent saving and validating, left out of the throughput
    val0 = validation_loss(ema.module, data, device, cfg, bf16)
    report["val_curve"].append([0, 0.0, val0])
    log.info("training: %d parameters, batch %d x %d frames (%d tokens/step), until %.0f s from now; held-out loss %s",
             params, batch, T, batch * T * N, train_end - time.perf_counter(), val0)

    def save(reason: str) -> None:
        nonlocal last_save
        t_save = time.perf_counter()
        extra = {
            "train_config": {**dataclasses.asdict(cfg), "datasets": [s["name"] for s in job.results["pack"]["sources"]],
                             "preset": cfg.preset if cfg.init_from == "none" else "warm start", "variant": model.cfg.variant},
            "codec": {"path": codec_path, "config": codec.config.to_dict(), "sha256": codec_sha},
            "sigma_data": model.sigma_data, "world_size": 1,
            "data": {"pack": str(Path(cfg.pack)), "windows": int(len(data.train_starts))},
            "last_loss": losses[-1][2] if losses else None,
            "gpu_job": {"setup": setup, "device": job.results.get("device", {}).get("name")},
        }  # fmt: skip
        folder = ckpt.save_checkpoint(work, step=step, model=model, model_config=model.cfg.to_dict(), optimizer=optimizer,
                                      ema=ema, extra=extra, keep=1)
        exported = export_checkpoint(folder, job.out)
        val = validation_loss(ema.module, data, device, cfg, bf16)
        report["val_curve"].append([step, round(time.perf_counter() - t_start, 2), val])
        report["checkpoints"].append({"step": step, "seconds": round(time.perf_counter() - t_start, 2), "why": reason,
                                      "path": str(exported.relative_to(job.out)), "val_loss": val})
        last_save = time.perf_counter()
        log.info("checkpoint step %d (%s): held-out loss %s", step, reason, val)
        paused[0] += time.perf_counter() - t_save
        report["checkpoint_seconds_total"] = round(paused[0], 2)
        _summarise(report, losses, steady_from, step, t_start, peak, paused[0])
        job.write()

    diverged = None
    while step == 0 or (time.perf_counter() < train_end and (cfg.max_steps is None or step < cfg.max_steps)):
        if cfg.max_steps is not None:  # an equal-budget run: the schedule is the steps', whatever the clock
            frac = min(1.0, step / cfg.max_steps)
        else:
            frac = min(1.0, (time.perf_counter() - t_start) / max(train_end - t_start, 1e-9))
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * (
            cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = data.train_starts[torch.randint(len(data.train_starts), (batch,), generator=g, device=device)]
        latents, actions, rewards, terms = data.batch(starts)
        if model.cfg.action_kind == "continuous":
            actions = actions.flatten(2).float()
        optimizer.zero_grad(set_to_none=True)
        try:
            with autocast_ctx(device, bf16):
                loss, stats = world_model_loss(view, latents, actions, rewards, terms, generator=g, forcing_cfg=forcing)
            loss.backward()
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            report["batch_size"], report["oom_halvings"] = batch, report["oom_halvings"] + 1
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            log.warning("out of memory: batch size halved to %d", batch)
            continue
        except Exception as e:  # noqa: BLE001 - torch.compile failures surface at the first call
            if call is model:
                raise
            report["compile"].update(used=False, error=f"{type(e).__name__}: {str(e)[:500]}")
            log.warning("torch.compile failed (%s: %s); training eagerly", type(e).__name__, str(e)[:300])
            call = model
            view = TrainView(model, call)
            continue
        if step == 0:
            report["compile"].setdefault("used", call is not model)
            report["first_step_seconds"] = round(time.perf_counter() - t_start, 2)
            log.info("first step done after %.1f s (compile %s)", report["first_step_seconds"], report["compile"])
        if not math.isfinite(stats["loss"]):
            diverged = f"non-finite loss {stats['loss']} at step {step + 1}"
            break
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not torch.isfinite(grad_norm):
            diverged = f"non-finite gradient norm at step {step + 1}"
            break
        optimizer.step()
        ema.update(model)
        step += 1
        now = time.perf_counter()
        losses.append([step, round(now - t_start, 3), stats["loss"], lr])
        if steady_from is None and step >= 20:
            steady_from = (step, now - paused[0])
        report["steps"] = step
        if now - last_save >= cfg.checkpoint_seconds:
            save("periodic")
    report["diverged"] = diverged
    if diverged:
        log.error("training diverged: %s; the last exported checkpoint is kept", diverged)
    elif step and report["checkpoints"] and report["checkpoints"][-1]["step"] == step:
        report["checkpoints"][-1]["why"] = "final"  # a periodic save landed on the last step
        job.write()
    elif step:
        save("final")
    _summarise(report, losses, steady_from, step, t_start, peak, paused[0])
    ema.module.eval()
    report["_ema_module"] = ema.module  # handed to the benchmark, dropped before writing
    return report


def _summarise(report: dict[str, Any], losses: list, steady_from, step: int, t_start: float, peak: float | None,
               paused: float = 0.0) -> None:
    seconds = time.perf_counter() - t_start
    tokens_per_step = report["batch_size"] * report["window"] * report["tokens_per_frame"]
    report["seconds"] = round(seconds, 2)
    report["tokens_per_step"] = tokens_per_step
    report["loss_curve"] = downsample(losses)
    report["final_loss"] = float(np.mean([r[2] for r in losses[-50:]])) if losses else None
    if step:
        report["steps_per_s"] = step / seconds
        report["tokens_per_s"] = step * tokens_per_step / seconds
    if steady_from is not None and step > steady_from[0]:
        dt_ = time.perf_counter() - paused - steady_from[1]  # training time only
        rate = (step - steady_from[0]) * tokens_per_step / dt_
        report["steady_tokens_per_s"] = rate  # from step 20 on: compile and warm-up excluded
        report["steady_frames_per_s"] = rate / report["tokens_per_frame"]
        flops = 6 * report["parameters"] * rate
        report["achieved_tflops"] = flops / 1e12
        report["mfu"] = flops / peak if peak else None


# ------------------------------------------------------------------------------ benchmark
@torch.no_grad()
def rollout_benchmark(model, codec, clip, device: torch.device, cfg: JobConfig, deadline: float) -> dict[str, Any]:
    """Dreamed frames/s at each batch size and the single-stream latency (RolloutSession.step:
    `sampler_steps` denoiser calls + commit + decode to pixels)."""
    frames, actions = clip
    rng = np.random.default_rng(cfg.seed)
    # Only the prefill (reset, not timed) runs the parallel attention; the timed steps run SDPA over
    # the KV cache whatever the backend. Chunked SDPA spares FlexAttention's compiles per batch size.
    set_attention_backend(model, "chunked")
    rows: list[dict[str, Any]] = []
    if model.cfg.action_kind != "discrete":
        return {"rows": [], "note": "the benchmark draws random discrete actions; this model takes continuous ones"}
    fallback = None  # a second backend, should a batch size fail with this one
    for b in cfg.bench_batches:
        if time.perf_counter() > deadline:
            rows.append({"batch": b, "skipped": "out of time"})
            continue
        for attempt in range(2):
            row = _bench_one(model, codec, frames, actions, b, device, cfg, rng, deadline)
            if "error" not in row or row["error"].startswith("out of memory") or attempt or fallback:
                break
            # A kernel that fails here should not cost the numbers: measure with the dense
            # reference attention in the (untimed) prefill instead, and say so.
            log.warning("rollout batch %d failed (%s); retrying with dense attention", b, row["error"][:200])
            fallback = "dense"
            set_attention_backend(model, fallback)
        if fallback:
            row["attn_backend"] = fallback
        rows.append(row)
    single = next((r for r in rows if r.get("batch") == 1 and "frames_per_s" in r), None)
    return {"sampler_steps": cfg.sampler_steps, "context_frames": int(len(frames)), "decode": True,
            "model": "trained EMA weights, float32", "prefill_attention": fallback or "chunked", "rows": rows,
            "single_stream_latency_ms": None if single is None else single["ms_per_step_median"]}


def _bench_one(model, codec, frames, actions, b: int, device: torch.device, cfg: JobConfig, rng, deadline: float) -> dict[str, Any]:
    n_actions = model.cfg.n_actions
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        session = RolloutSession(model, codec, batch=b, sampler_steps=cfg.sampler_steps, seed=cfg.seed)
        session.reset(np.repeat(frames[None], b, 0), np.repeat(actions[None], b, 0))
        for _ in range(2):  # warm-up
            session.step(rng.integers(0, n_actions, b))
        times = []
        for _ in range(cfg.bench_steps):
            a = rng.integers(0, n_actions, b)
            sync(device)
            t = time.perf_counter()
            session.step(a)  # returns frames on the CPU: synchronised
            times.append(time.perf_counter() - t)
            if time.perf_counter() > deadline + 30:
                break
        total = sum(times)
        row = {"batch": b, "steps": len(times), "frames_per_s": b * len(times) / total,
               "ms_per_step_median": 1e3 * statistics.median(times), "ms_per_step_min": 1e3 * min(times)}
        if device.type == "cuda":
            row["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        log.info("rollout batch %d: %.1f frames/s, %.2f ms per step (median)", b, row["frames_per_s"], row["ms_per_step_median"])
        return row
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {"batch": b, "error": f"out of memory: {str(e)[:200]}"}
    except Exception as e:  # noqa: BLE001 - one failed batch size must not lose the others
        return {"batch": b, "error": f"{type(e).__name__}: {str(e)[:300]}"}


# ------------------------------------------------------------------------------ main
def run(cfg: JobConfig) -> int:
    job = Job(cfg)
    out = job.out
    setup_logging(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        device = resolve_device(cfg.device)
    except JobInputError as e:
        return _fail(job, "bad input", str(e), 2)
    job.results["device"] = device_info(device)
    if device.type == "cuda":
        # FlexAttention is compiled per shape and dtype (checks, training, validation, rollout
        # prefill, several batch sizes): more variants than dynamo's default cache of 8.
        dynamo_config = importlib.import_module("torch._dynamo").config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
    log.info("gpu job on %s (torch %s), budget %.1f min, results in %s", job.results["device"]["name"], torch.__version__,
             cfg.minutes, out)
    job.write()
    try:
        try:
            pack = open_pack(cfg.pack)
        except PackError as e:
            raise JobInputError(str(e)) from None
        job.results["pack"] = {"path": str(cfg.pack), "episodes": len(pack), "steps": pack.total_steps,
                               "sources": pack.manifest["sources"], "video": pack.manifest["video"],
                               "frame_shape": pack.manifest["frame_shape"], "dropped": pack.manifest["dropped"]}

        # 1. self-check, the parts that need no data
        job.results["status"] = "self-check"
        t = time.perf_counter()
        checks = kernel_checks(device, pack)
        job.results["self_check"] = {"passed": all(c.ok for c in checks), "checks": [dataclasses.asdict(c) for c in checks],
                                     "seconds": round(time.perf_counter() - t, 2)}
        job.write()
        raise_if_failed(checks)

        # 2. model source, codec, data
        init_from = cfg.init_from
        if init_from is None:
            init_from = str(bundled.bundle_location())
        elif init_from.lower() == "none":
            init_from = None
        codec, codec_path = load_codec_for(cfg, init_from)
        codec = codec.to(device).eval().requires_grad_(False)
        frame_shape = tuple(pack.frame_shape)
        want = (codec.config.image_size, codec.config.image_size, codec.config.image_channels)
        if frame_shape != want:
            raise JobInputError(f"{pack.path}: frames are {frame_shape}, the codec {codec_path} takes {want}")
        job.results["status"] = "loading data"
        data = load_device_data(pack, codec, device, cfg)
        job.results["data"] = data.stats
        log.info("data: %s", data.stats)
        model, report = build_model(cfg, init_from, codec.config, pack.action_space)
        model = model.to(device)
        job.results["model"] = {"config": model.cfg.to_dict(), "parameters": model.num_parameters(), "warm_start": report,
                                "codec": codec_path, "codec_sha256": codec_fingerprint(codec)}
        job.write()

        # 1b. self-check: one real training step in the training setup
        if device.type == "cuda":
            harmonize_flex_dtypes()
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        step_check, setup = run_check_with_setup(lambda: check_train_step(model, data, device, cfg))
        checks.append(step_check)
        job.results["self_check"].update(passed=all(c.ok for c in checks), checks=[dataclasses.asdict(c) for c in checks],
                                         seconds=round(time.perf_counter() - t, 2))
        job.write()
        raise_if_failed(checks)
        set_attention_backend(model, setup["attn_backend"])

        # 3. train
        job.results["status"] = "training"
        job.write()
        work = Path(cfg.work) if cfg.work else Path(tempfile.mkdtemp(prefix="worldsim-gpu-job-"))
        report = train(job, model, codec, codec_path, data, device, setup, work)
        ema_module = report.pop("_ema_module")
        job.results["checkpoint"] = report["checkpoints"][-1]["path"] if report["checkpoints"] else None
        if report.get("diverged"):
            job.results["status"] = "diverged"
            job.write()
            return 4
        job.write()

        # 4. rollout benchmark
        job.results["status"] = "benchmark"
        job.write()
        bench_deadline = job.deadline - 2  # a batch size is started only before this
        job.results["bench"] = rollout_benchmark(ema_module, codec, data.clip, device, cfg, bench_deadline)
        job.results["status"] = "done"
        job.write()
        _print_summary(job)
        return 0
    except JobInputError as e:
        return _fail(job, "bad input", str(e), 2)
    except SelfCheckFailed as e:
        return _fail(job, "self-check failed", str(e), 3)
    except Exception as e:  # noqa: BLE001 - report it in results.json, then exit non-zero
        return _fail(job, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", 1)


def run_check_with_setup(fn) -> tuple[Check, dict[str, Any]]:
    t = time.perf_counter()
    try:
        result, setup = fn()
    except Exception as e:  # noqa: BLE001
        result, setup = Check("train_step", False, message=f"{type(e).__name__}: {e}"), {}
    result.seconds = round(time.perf_counter() - t, 3)
    log.info("self-check %-22s %s %.1f s %s %s", result.name, "ok" if result.ok else "FAILED", result.seconds,
             result.message, {k: result.detail.get(k) for k in ("bf16", "attn_backend", "loss")})
    return result, setup


def _fail(job: Job, status: str, message: str, code: int) -> int:
    job.results["status"] = status
    job.results["error"] = message
    job.write()
    log.error("%s: %s", status.upper(), message)
    print(f"GPU JOB {status.upper()}: {message.splitlines()[0]}", file=sys.stderr, flush=True)
    return code


def _print_summary(job: Job) -> None:
    r = job.results
    tr = r.get("train", {})
    lines = [f"GPU JOB DONE on {r['device']['name']} in {r['seconds'] if 'seconds' in r else job.elapsed():.0f} s: "
             f"{tr.get('steps')} steps, batch {tr.get('batch_size')}, loss {tr.get('final_loss')}"]
    if tr.get("steady_tokens_per_s"):
        mfu = tr.get("mfu")
        lines.append(f"  {tr['steady_tokens_per_s']:.3g} tokens/s, {tr['achieved_tflops']:.3g} TFLOP/s (6 N D), "
                     f"MFU {'n/a' if mfu is None else f'{100 * mfu:.2f} %'}")
    for row in r.get("bench", {}).get("rows", []):
        if "frames_per_s" in row:
            lines.append(f"  dream batch {row['batch']:>5}: {row['frames_per_s']:10.1f} frames/s, "
                         f"{row['ms_per_step_median']:.2f} ms per step")
    lines.append(f"  checkpoint: {r.get('checkpoint')}; results: {job.out / RESULTS_FILE}")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
