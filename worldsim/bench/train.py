"""`worldsim bench train`: training-step time and peak memory vs window length, LSSVWM vs baselines.

For each variant (default: lssvwm and the causal full-attention baseline) and each window length T
(default 16 .. 256 frames), one full training step (diffusion-forcing loss, backward, AdamW) on
random latents of the preset's shape is timed, and its peak memory measured. A power law
y = a * T^s is fitted by least squares in log-log space; s ~ 1 is linear (the goal for LSSVWM:
s <= 1.1), s ~ 2 quadratic (full attention, once attention dominates).

Method:
  * Every (variant, T) point runs in a fresh spawned process, so no point inherits another's
    allocator state or peak.
  * Time: 1 warm-up step, then `steps` timed steps (CUDA: synchronised); the table shows the
    median and the fastest, and the slope is fitted to the fastest (on a shared machine the one
    least disturbed by other jobs; the median is in the results too).
  * Peak memory, CPU: a 3-frame step runs first (it faults in the libraries' code pages and
    creates the gradients and AdamW moments, which do not depend on T); freed heap is returned
    to the OS (glibc malloc_trim) and the resident set (/proc/self/statm) taken as the baseline.
    The figure is the process's resident high-water mark (getrusage ru_maxrss) after the steps at
    T, minus that baseline: the step's activations and temporaries. (tracemalloc does not see
    PyTorch's allocations, and the profiler's per-op memory records give no peak without
    replaying them.) Heap the 3-frame step left that could not be trimmed is reused by the real
    step and so undercounts it slightly, by at most the 3-frame step's own peak.
    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the memory
    allocated at the baseline.
  * FLOPs: counted once per point with torch.utils.flop_counter (matmuls, convolutions and
    attention, counting the attention a kernel computes including masked-out positions), reported
    as achieved TFLOP/s. On a GPU, MFU = achieved / peak (a table of dense bf16 / tf32 / fp32
    peaks for common cards, or --peak-tflops).
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import math
import multiprocessing as mp
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from worldsim.model.config import VARIANTS, make_config
from worldsim.model.loss import world_model_loss
from worldsim.model.world_model import WorldModel


@dataclass
class TrainBenchConfig:
    preset: str = "tiny"
    """Model preset (worldsim.model.config.PRESETS)."""
    variants: tuple[str, ...] = ("lssvwm", "causal_full")
    """Variants measured side by side."""
    windows: tuple[int, ...] = (16, 32, 64, 128, 256)
    """Window lengths T (frames per training sample)."""
    batch: int = 1
    """Samples per step."""
    steps: int = 3
    """Timed steps per point (after one warm-up step)."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu" or "cuda"."""
    dtype: str = "float32"
    """Parameter dtype for the CPU; on CUDA the step runs under bf16 autocast when "bfloat16"."""
    count_flops: bool = True
    """Count FLOPs of one step per point (an extra step)."""
    peak_tflops: float | None = None
    """Device peak for MFU; None looks the GPU up in `PEAK_TFLOPS`."""
    threads: int | None = None
    """torch CPU threads in each point's process (None: torch's default)."""
    seed: int = 0
    """Seeds the weights and the batches."""


# Dense peak TFLOP/s (no sparsity) by (name fragment, precision), from the vendors' data sheets.
PEAK_TFLOPS = {
    ("H200", "bfloat16"): 989.0, ("H100", "bfloat16"): 989.0, ("A100", "bfloat16"): 312.0,
    ("H200", "float32"): 494.7, ("H100", "float32"): 494.7, ("A100", "float32"): 156.0,  # TF32 matmuls
    ("L4", "bfloat16"): 121.0, ("L4", "float32"): 60.0,
}


def rss_bytes() -> int:
    """Current resident set of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc), so the resident set is what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _attention_flop_counter():
    """A FlopCounterMode that also counts the CPU flash-attention kernel (not in torch's table)."""
    aten = torch.ops.aten

    def forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        b, h, lq, d = query_shape
        return 4 * b * h * lq * key_shape[-2] * d  # two matmuls of 2 * lq * lk * d each

    def backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * forward_flops(query_shape, key_shape, value_shape)  # the usual 2x forward

    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: forward_flops,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: backward_flops}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def measure_point(cfg_dict: dict[str, Any], variant: str, window: int) -> dict[str, Any]:
    """One (variant, T) point in this process: time per step, peak memory, FLOPs. Run it fresh."""


    cfg = TrainBenchConfig(**cfg_dict)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    cuda = device.type == "cuda"
    dtype = getattr(torch, cfg.dtype)
    autocast = cuda and dtype == torch.bfloat16
    torch.manual_seed(cfg.seed)
    model_cfg = make_config(cfg.preset, variant)
    model = WorldModel(model_cfg).to(device=device, dtype=torch.float32 if autocast else dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    B, T = cfg.batch, window

    def batch_of(frames: int) -> tuple:
        latents = torch.randn(B, frames, model_cfg.latent_channels, *model_cfg.latent_grid, device=device,
                              dtype=model.net.patch_in.weight.dtype, generator=g)
        if model_cfg.action_kind == "discrete":
            actions = torch.randint(0, model_cfg.n_actions, (B, frames), device=device, generator=g)
        else:
            actions = torch.randn(B, frames, model_cfg.action_dim, device=device, generator=g)
        rewards = torch.zeros(B, frames, device=device)
        return latents, actions, rewards, torch.zeros(B, frames, dtype=torch.bool, device=device)

    def step(batch: tuple) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = world_model_loss(model, *batch, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()

    # A 3-frame step first: it faults in the libraries' code pages and creates the gradients and
    # AdamW moments, none of which depends on T. Freed heap goes back to the OS (malloc_trim)
    # before the baseline, so the high-water mark above it is this window's step.
    step(batch_of(3))
    batch = batch_of(T)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        mem_before = torch.cuda.memory_allocated()
    else:
        malloc_trim()
        mem_before = rss_bytes()
    step(batch)  # warm-up at this shape: allocator, kernel selection
    times = []
    for _ in range(cfg.steps):
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - mem_before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - mem_before  # KiB on Linux

    flops = None
    if cfg.count_flops:
        counter = _attention_flop_counter()
        with counter:
            step(batch)
        flops = counter.get_total_flops()

    step_s = statistics.median(times)
    best_s = min(times)
    tokens = B * T * model_cfg.tokens_per_frame
    n_params = model.num_parameters()
    point = {
        "variant": variant, "window": T, "tokens": tokens, "step_s": step_s, "best_step_s": best_s, "step_s_all": times,
        "tokens_per_s": tokens / step_s, "peak_mem_mb": peak / 2**20,
        "params": n_params, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "threads": torch.get_num_threads(), "flops": flops,
        "tflops_per_s": None if flops is None else flops / step_s / 1e12, "mfu": None,
    }
    if cuda and flops is not None:
        peak_tflops = cfg.peak_tflops
        if peak_tflops is None:
            precision = "bfloat16" if autocast else "float32"
            peak_tflops = next((v for (name, p), v in PEAK_TFLOPS.items()
                                if name in point["device"] and p == precision), None)
        if peak_tflops:
            point["mfu"] = point["tflops_per_s"] / peak_tflops
    return point


def fit_slope(windows: list[int], values: list[float]) -> float | None:
    """Exponent s of the least-squares power law values ~ a * windows^s (None below 2 valid points)."""
    pairs = [(w, v) for w, v in zip(windows, values) if v is not None and v > 0]
    if len(pairs) < 2:
        return None
    x = np.log([w for w, _ in pairs])
    y = np.log([v for _, v in pairs])
    return float(np.polyfit(x, y, 1)[0])


def _run_isolated(cfg: TrainBenchConfig, variant: str, window: int) -> dict[str, Any]:
    """measure_point in a fresh spawned process; a crash (e.g. out of memory) becomes an error row."""
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            return pool.submit(measure_point, asdict(cfg), variant, window).result()
        except Exception as exc:  # noqa: BLE001 - recorded in the results, the sweep goes on
            return {"variant": variant, "window": window, "error": f"{type(exc).__name__}: {exc}"}


def run(cfg: TrainBenchConfig = TrainBenchConfig(), progress: bool = True) -> dict[str, Any]:
    """Measure every (variant, window) point; returns points, fitted slopes and the goal check."""
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; expected some of {VARIANTS}")
    if not cfg.windows or min(cfg.windows) < 3:
        raise ValueError(f"windows must be >= 3 frames (diffusion forcing's clean prefix), got {cfg.windows}")
    points = []
    for window in sorted(cfg.windows):
        for variant in cfg.variants:
            start = time.perf_counter()
            point = _run_isolated(cfg, variant, window)
            points.append(point)
            if progress:
                what = point.get("error") or f"{point['step_s'] * 1e3:.0f} ms/step, {point['peak_mem_mb']:.0f} MB"
                print(f"  {variant:>13} T={window:<4} {what}  ({time.perf_counter() - start:.0f} s)", flush=True)
    fits = {}
    for variant in cfg.variants:
        rows = [p for p in points if p["variant"] == variant and "error" not in p]
        windows = [p["window"] for p in rows]
        fits[variant] = {
            # The fastest step: the one least disturbed by other jobs on a shared machine.
            "time_slope": fit_slope(windows, [p["best_step_s"] for p in rows]),
            "memory_slope": fit_slope(windows, [p["peak_mem_mb"] for p in rows]),
        }
    lssvwm_slope = fits.get("lssvwm", {}).get("time_slope")
    return {
        "config": asdict(cfg),
        "points": points,
        "fits": fits,
        "goal": "lssvwm time slope <= 1.1 (linear in the window length)",
        "goal_met": None if lssvwm_slope is None else lssvwm_slope <= 1.1,
    }


def format_table(results: dict[str, Any]) -> str:
    """Windows as rows, the variants side by side; slopes and the goal below."""
    cfg = results["config"]
    variants = list(cfg["variants"])
    by_key = {(p["variant"], p["window"]): p for p in results["points"]}
    ok = [p for p in results["points"] if "error" not in p]
    gpu = any(p["device"] != "cpu" for p in ok)
    device = ok[0]["device"] if ok else "?"
    threads = ok[0]["threads"] if ok else "?"
    lines = [f"training step vs window: preset {cfg['preset']}, batch {cfg['batch']}, {cfg['dtype']}, "
             f"{device} ({threads} threads), {cfg['steps']} timed steps per point"]
    cols = ["ms/step", "best ms", "peak MB", "TFLOP/s"] + (["tok/s", "MFU"] if gpu else [])
    header = f"{'T':>5} {'tokens':>7} | " + " | ".join(f"{v:^{11 * len(cols)}}" for v in variants)
    sub = f"{'':>5} {'':>7} | " + " | ".join("".join(f"{c:>11}" for c in cols) for _ in variants)
    lines += [header, sub, "-" * len(sub)]
    for window in sorted(cfg["windows"]):
        cells = []
        tokens = ""
        for v in variants:
            p = by_key.get((v, window), {"error": "missing"})
            if "error" in p:
                cells.append(f"{p['error'][:11 * len(cols)]:>{11 * len(cols)}}")
                continue
            tokens = p["tokens"]
            vals = [f"{p['step_s'] * 1e3:11.1f}", f"{p['best_step_s'] * 1e3:11.1f}", f"{p['peak_mem_mb']:11.1f}",
                    f"{p['tflops_per_s']:11.4f}" if p["tflops_per_s"] is not None else f"{'-':>11}"]
            if gpu:
                vals += [f"{p['tokens_per_s']:11.0f}", f"{p['mfu']:11.1%}" if p["mfu"] is not None else f"{'-':>11}"]
            cells.append("".join(vals))
        lines.append(f"{window:>5} {tokens:>7} | " + " | ".join(cells))
    lines.append("")
    for v, fit in results["fits"].items():
        t, m = fit["time_slope"], fit["memory_slope"]
        fmt = lambda s: "n/a" if s is None or math.isnan(s) else f"{s:.2f}"  # noqa: E731
        lines.append(f"{v:>13}: time ~ T^{fmt(t)}, peak memory ~ T^{fmt(m)}")
    met = results["goal_met"]
    lines.append("(slopes: least-squares power law over the windows; time fitted to the fastest step)")
    lines.append(f"goal: {results['goal']}: {'n/a' if met is None else ('met' if met else 'NOT met')}")
    return "\n".join(lines)
