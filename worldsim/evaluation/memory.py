"""`worldsim eval memory`: does a world model remember a place it saw long ago?

    results = evaluate_memory(MemoryEvalConfig(checkpoints={"lssvwm": "runs/a", "causal_window": "runs/b"},
                                               dataset="worldsim/mm9-test-v0", out_dir="eval/memory"))

Targets. A target is a step t_now of a held-out episode where the agent is back at a pose it last
had at t_before, with gap = t_now - t_before larger than every evaluated model's attention window
(`min_gap`, default the largest finite window): the frame can only be predicted from what the
model carried over from before its window (SSM state), or from a full-context cache. Each target
is one window of the episode, as in `worldsim.evaluation.prediction`: `context` real frames
o_{t_now-C} .. o_{t_now-1} and `horizon` real targets o_{t_now} .. o_{t_now+H-1}. A target
qualifies only when its earlier visit lies inside the context (gap <= C: the model has seen it)
and the whole window lies inside the episode; the others are counted by reason in the results.

Two protocols, which differ in where the (t_now, t_before) pairs come from:

  * "revisits": the pairs recorded in each episode's metadata ("revisits", written at collection
    time by `worldsim.collect` from the trajectories of the exploration policies that come
    back to old places on purpose).
  * "retrieval": the paper's protocol adapted to our data. The paper (arXiv 2505.20171) generates
    trajectories that walk out and then come back along the same path, gives the model the
    outbound frames as context and scores the frames of the way back. Replaying a segment's
    actions in reverse does not retrace it in Memory Maze (turns and collisions are not
    invertible, and the way back would look the other way), and the data holds no such scripted
    trajectories. So the retrieval targets are the returns found post hoc in the recorded poses:
    `find_revisits` on each episode's infos (agent_pos / agent_dir, or player_pos /
    player_facing) with min_gap = the qualifying gap, so short returns just outside the window
    count too. Unlike the paper, the path back is whatever the agent did, and a target's
    `horizon` frames follow the agent on from the return, not necessarily along the old path.

Prediction. For every model the C context frames are committed to a `RolloutSession` at sigma 0
(`prefill_chunk` frames per parallel forward, continuing the cache, so the memory of a long context
stays bounded), then the H targets are dreamed open loop from the true actions. Targets run as
B parallel streams, each with its own noise generator (seeded per target, the same for every model).

Scores: PSNR and SSIM (`worldsim.evaluation.metrics`) of every dreamed frame against the real one,
averaged over the H steps per target, then per bucket of gaps (`gap_edges`): mean, standard error
over targets, count. Two model-free references share the buckets: "copy_last" (the last context
frame as every prediction: what a model without memory that predicts "nothing moves" scores) and
"earlier_visit" (the real frames from t_before on as the predictions of those from t_now on: how
alike the old and new views are, an easy score for a model that recalls them). LPIPS is not
reported: its network weights cannot be fetched offline.

Ablation (`window_only`): each model also runs with only its last W context frames committed
(W = its attention window; for a model without a finite one, mamba_only or causal_full, the
widest finite window among the compared models, so its row answers the same question as the
LSSVWM's: does anything from before those frames help?), the same targets and noise. Nothing from
before the window reaches it, so the full-context score minus this one is what the model carried
over from beyond its window: memory, measured on one set of weights. Its routes: the SSM state,
and for frames up to layers x window back, attention over attention (each layer's keys were
computed by a layer that saw one window further back); only a state reaches further. The results
give it per target and by gap ("window_only_gain": full minus window only, mean and standard error of
the paired differences).

Control (`foreign_past`): each model also runs with its full context length, the frames before its
window taken from another episode's context (the same targets and noise; the action into the
first own frame is its own). A state that only helps by being warmed up, whatever it saw, scores
the same with a foreign past; one that recalls this episode's earlier views does not. Full minus
foreign past ("foreign_past_gain") is the memory of the episode itself; foreign past minus window
only, what any past gives.

Comparison: the first checkpoint named minus each other one, per target ("first_minus", mean and
standard error of the paired differences): the LSSVWM against a baseline on the same targets and
noise, so the error bar is that of the difference, not of either score.

State retention: during each model's first full-context prefill, how long its SSM heads keep
what they saw (`worldsim.evaluation.state_retention`: per head, frames until 1/e of a frame's
state is left, on these frames), and how many heads outlast the attention window. A model whose
heads all forget within the window cannot show memory, whatever the scores.

Output: the results dict (JSON-able), `memory.json` and one PNG per protocol (PSNR and SSIM
against the gap, one line per model, references dashed) in `out_dir` when given.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import torch
from tqdm import tqdm

from worldsim.data.revisits import find_revisits
from worldsim.collect import POSE_INFO_KEYS
from worldsim.data.episode_store import EpisodeStore
from worldsim.evaluation.metrics import psnr, ssim
from worldsim.evaluation.prediction import Window, check_compatible, read_windows
from worldsim.evaluation.state_retention import SSMRetention, describe
from worldsim.loading import load_dream_model
from worldsim.rollout.session import RolloutSession


PROTOCOLS = ("revisits", "retrieval")
REFERENCES = ("copy_last", "earlier_visit")


@dataclass
class MemoryEvalConfig:
    checkpoints: dict[str, str]
    """Label -> world-model run or checkpoint folder (each with the codec it records)."""
    dataset: str
    """Minari dataset id or path holding the held-out episodes."""
    protocols: tuple[str, ...] = ("revisits", "retrieval")
    """Any of "revisits" (pairs from the episode metadata) and "retrieval" (found in the infos)."""
    episodes: int | None = None
    """Evaluate the first N episodes of the dataset; None: all of them."""
    context: int = 200
    """Real frames committed before predicting (C); the earlier visit must lie within them."""
    horizon: int = 8
    """Frames dreamed open loop from the revisit on (H)."""
    min_gap: int | None = None
    """Targets need gap > min_gap; None: the largest attention window of the models."""
    gap_edges: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
    """Bucket boundaries of the gap: [e_i, e_i+1), below the first and from the last on."""
    max_targets: int | None = None
    """Per protocol, a seeded random subset of at most this many targets; None: all."""
    pos_tol: float = 0.5
    """Retrieval: positions within this distance match (the infos' unit, grid cells in Memory Maze).
    For the memory question use tight returns (0.1 cells, 5 degrees): at the defaults the earlier
    "return" on the spin probes often shows another view, and replaying it scores below copying the
    last frame (17.2 against 17.9 dB; 22.7 against 17.6 at the tight setting)."""
    dir_tol_deg: float = 30.0
    """Retrieval: headings within this angle match."""
    sampler_steps: int = 2
    """Denoiser calls per dreamed frame."""
    seed: int = 0
    """Fixes the target subset and the sampler noise."""
    batch_size: int = 16
    """Targets streamed together (memory bound only: results do not depend on it)."""
    prefill_chunk: int = 64
    """Context frames per parallel forward when committing the context."""
    window_only: bool = False
    """Also score each model given only its attention window of context frames (a model without a
    finite window: the widest finite window compared; labelled "<label>, window only"): the same
    weights without anything from beyond the window, so the difference from the full context is
    what its state carried over (an ablation)."""
    foreign_past: bool = False
    """Also score each model with the context frames before its window (as `window_only` counts
    them) taken from another episode's context, labelled "<label>, foreign past": full minus this
    is what its state kept of this episode's own past, apart from any gain of a warmed-up state (a
    control; needs targets in at least two episodes)."""
    out_dir: str | None = None
    """Folder for memory.json and the PNG plots; None writes nothing."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu" or "cuda"."""

    def validate(self) -> None:
        if not self.checkpoints:
            raise ValueError("give at least one checkpoint (label=path)")
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ValueError(f"protocols must be a non-empty subset of {PROTOCOLS}, got {list(self.protocols)}")
        for name in ("context", "horizon", "sampler_steps", "batch_size", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("episodes", "max_targets"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None for all), got {getattr(self, name)}")
        if self.min_gap is not None and self.min_gap < 0:
            raise ValueError(f"min_gap must be >= 0, got {self.min_gap}")
        if list(self.gap_edges) != sorted(set(self.gap_edges)) or not self.gap_edges:
            raise ValueError(f"gap_edges must be strictly increasing, got {list(self.gap_edges)}")


@dataclass
class Target:
    episode: int
    t_now: int
    t_before: int
    seed: int = 0

    @property
    def gap(self) -> int:
        return self.t_now - self.t_before


# ------------------------------------------------------------------------------ targets
def attention_window(model_cfg) -> int | None:
    """Frames a model can see besides the SSM state: its attention window; None = unbounded
    (causal_full) or no attention (mamba_only: everything it knows comes from the state)."""
    return model_cfg.attn_window if model_cfg.has_attention else None


def attention_reach(model_cfg) -> int | None:
    """How far back attention alone can carry a frame: layers x window (each layer's keys were made
    by a layer that saw one window further back); beyond it only a state can. None: no finite window."""
    window = attention_window(model_cfg)
    return None if window is None else model_cfg.n_layers * window


def window_markers(results: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(model, "window" | "attention reach", gap) for every compared model with a finite window:
    what the plots mark on the gap axis."""
    reach = results.get("attention_reach", {})
    marks = []
    for label, window in results["attention_windows"].items():
        if window:
            marks.append((label, "window", window))
            if reach.get(label):
                marks.append((label, "attention reach", reach[label]))
    return marks


def ablation_window(windows: dict[str, int | None], label: str) -> int | None:
    """Context frames a model keeps in the window-only ablation: its attention window, or for a
    model without a finite one the widest finite window compared (None: no window anywhere)."""
    return windows[label] or max((w for w in windows.values() if w), default=None)


def qualifying_gap(cfg: MemoryEvalConfig, windows: dict[str, int | None]) -> int:
    """The gap a target must exceed: min_gap, or the largest finite attention window."""
    finite = [w for w in windows.values() if w is not None]
    widest = max(finite, default=None)
    if cfg.min_gap is None:
        if widest is None:
            raise ValueError(f"no model has a finite attention window ({windows}): pass min_gap")
        return widest
    if widest is not None and cfg.min_gap < widest:
        raise ValueError(f"min_gap {cfg.min_gap} is inside the attention window of a model ({windows}): "
                         f"those frames do not test long-term memory; use min_gap >= {widest}")
    return cfg.min_gap


def episode_metadata(store, episode: int) -> dict[str, Any]:
    path = store.data_path / str(episode) / "metadata.json"
    if not path.is_file():
        return {}  # hdf5 datasets keep no per-episode metadata file: no recorded revisits
    with open(path) as f:
        return json.load(f)


def episode_poses(store, episode: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(positions (T+1, 2), headings (T+1, 2)) from an arrow episode's infos; None without a pose."""
    if store.data_format != "arrow":
        raise ValueError(f"{store.name}: the retrieval protocol reads poses from arrow infos, "
                         f"this dataset is {store.data_format}")
    files = sorted((store.data_path / str(episode)).glob("*.arrow"))
    # Only the infos column is read: the memory-mapped frames are never touched.
    readers = [pa.ipc.open_file(pa.memory_map(str(f), "r")) for f in files]
    if not readers or any("infos" not in r.schema.names for r in readers):
        return None
    tables = [r.read_all().select(["infos"]) for r in readers]
    infos = pa.concat_tables(tables).column("infos").combine_chunks()
    names = {infos.type.field(i).name for i in range(infos.type.num_fields)}
    for pos_key, dir_key in POSE_INFO_KEYS:
        if pos_key in names and dir_key in names:
            pos = np.asarray(infos.field(pos_key).to_pylist(), dtype=np.float64)
            heading = np.asarray(infos.field(dir_key).to_pylist(), dtype=np.float64)
            return pos, heading
    return None


def candidate_pairs(store, protocol: str, n_episodes: int, gap: int, cfg: MemoryEvalConfig) -> list[Target]:
    """Every (episode, t_now, t_before) the protocol names, before the window checks."""

    out = []
    for ep in range(n_episodes):
        if protocol == "revisits":
            pairs = episode_metadata(store, ep).get("revisits", [])
        else:
            poses = episode_poses(store, ep)
            pairs = [] if poses is None else find_revisits(poses[0], poses[1], min_gap=gap + 1,
                                                           pos_tol=cfg.pos_tol, dir_tol_deg=cfg.dir_tol_deg)
        out += [Target(ep, int(a), int(b)) for a, b in sorted({(int(a), int(b)) for a, b in pairs})]
    return out


def select_targets(candidates: list[Target], episode_steps: np.ndarray, gap: int,
                   cfg: MemoryEvalConfig, protocol: str) -> tuple[list[Target], dict[str, int]]:
    """-> (qualifying targets with their seeds, how many were excluded for each reason)."""
    excluded = {"within_window": 0, "beyond_context": 0, "too_close_to_start": 0, "too_close_to_end": 0}
    kept = []
    for t in candidates:
        if t.gap <= gap:
            excluded["within_window"] += 1
        elif t.gap > cfg.context:
            excluded["beyond_context"] += 1
        elif t.t_now - cfg.context < 0:
            excluded["too_close_to_start"] += 1
        elif t.t_now + cfg.horizon > int(episode_steps[t.episode]):  # a window reads steps [t_now - C, t_now + H)
            excluded["too_close_to_end"] += 1
        else:
            kept.append(t)
    if not kept:
        raise ValueError(
            f"protocol {protocol!r}: no target qualifies out of {len(candidates)} candidate revisits "
            f"({', '.join(f'{k}: {v}' for k, v in excluded.items())}); a target needs {gap} < gap <= context "
            f"{cfg.context}, t_now >= context and t_now + horizon {cfg.horizon} <= episode steps: "
            f"raise --context, lower --horizon or use episodes with longer revisits"
        )
    rng = np.random.default_rng([cfg.seed, PROTOCOLS.index(protocol)])
    if cfg.max_targets is not None and len(kept) > cfg.max_targets:
        kept = [kept[i] for i in np.sort(rng.choice(len(kept), size=cfg.max_targets, replace=False))]
    for t, s in zip(kept, rng.integers(0, 2**63 - 1, size=len(kept)).tolist()):
        t.seed = int(s)
    return kept, excluded


# ------------------------------------------------------------------------------ predictions
def foreign_donors(targets: list[Target]) -> list[Target]:
    """For each target, the next one in the list (cyclically) from another episode: whose context
    lends the frames before the window in the `foreign_past` control."""
    donors = []
    for j, target in enumerate(targets):
        others = (targets[(j + k) % len(targets)] for k in range(1, len(targets)))
        donor = next((t for t in others if t.episode != target.episode), None)
        if donor is None:
            raise ValueError("foreign_past needs targets in at least two episodes; every target is in "
                             f"episode {target.episode} (more episodes, or a larger max_targets)")
        donors.append(donor)
    return donors


def splice_past(frames: np.ndarray, actions: np.ndarray, donor_frames: np.ndarray, donor_actions: np.ndarray,
                cut: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `cut` frames (and the actions between them) from the donor windows, the rest and
    the action into frame `cut` from the own ones; action i leads to frame i + 1."""
    if cut < 1:
        return frames, actions
    return (np.concatenate([donor_frames[:, :cut], frames[:, cut:]], axis=1),
            np.concatenate([donor_actions[:, : cut - 1], actions[:, cut - 1 :]], axis=1))


@torch.no_grad()
def prefill_session(model, codec, frames: np.ndarray, actions: np.ndarray, seeds: list[int],
                    sampler_steps: int, chunk: int):
    """A `RolloutSession` whose B streams have seen frames (B, C, H, W, 3) with actions (B, C - 1[, D]),
    committed at sigma 0 in parallel forwards of `chunk` frames that continue the cache (the same
    state as one forward over all C frames, without its memory for long contexts)."""

    B, C = frames.shape[:2]
    session = RolloutSession(model, codec, batch=B, sampler_steps=sampler_steps)
    first = min(chunk, C)
    session.reset(frames[:, :first], actions[:, : first - 1], seeds=seeds)
    for a in range(first, C, chunk):
        b = min(a + chunk, C)
        session.extend(frames[:, a:b], actions[:, a - 1 : b - 1])  # action i led to frame i + 1
    return session


@torch.no_grad()
def dream_targets(model, codec, frames: np.ndarray, actions: np.ndarray, context: int, seeds: list[int],
                  sampler_steps: int, chunk: int) -> torch.Tensor:
    """Open-loop frames after the context: uint8 (B, H, H_img, W_img, 3) on the CPU."""
    session = prefill_session(model, codec, frames[:, :context], actions[:, : context - 1], seeds,
                              sampler_steps, chunk)
    horizon = frames.shape[1] - context
    return torch.stack([session.step(actions[:, context - 1 + t]).frames for t in range(horizon)], dim=1)


def frame_scores(reference: torch.Tensor, prediction: torch.Tensor) -> dict[str, np.ndarray]:
    """uint8 (B, H, ...) pairs -> {"psnr", "ssim"}: per target, the mean over the H steps (B,)."""

    B, H = reference.shape[:2]
    ref, pred = reference.flatten(0, 1), prediction.flatten(0, 1)
    return {name: fn(ref, pred).numpy().reshape(B, H).mean(axis=1) for name, fn in (("psnr", psnr), ("ssim", ssim))}


def reference_scores(frames: np.ndarray, targets: list[Target], context: int) -> dict[str, dict[str, np.ndarray]]:
    """The model-free references (module doc) for windows starting at t_now - context."""
    real = torch.as_tensor(frames[:, context:])  # (B, H, ...)
    horizon = real.shape[1]
    last = torch.as_tensor(frames[:, context - 1 : context]).expand_as(real)
    # Frame t_before + k sits at index context - gap + k of a window; gap >= horizon is not needed:
    # when the earlier views run into the targets, the targets themselves are what was seen.
    earlier = torch.stack([torch.as_tensor(frames[i, context - t.gap : context - t.gap + horizon])
                           for i, t in enumerate(targets)])
    return {"copy_last": frame_scores(real, last), "earlier_visit": frame_scores(real, earlier)}


# ------------------------------------------------------------------------------ summaries
def bucket_of(gap: int, edges: tuple[int, ...]) -> tuple[int, int | None]:
    """[lo, hi) of the bucket holding gap (hi None: open above; lo 0 below the first edge)."""
    i = int(np.searchsorted(edges, gap, side="right"))  # edges[i - 1] <= gap < edges[i]
    return (0 if i == 0 else edges[i - 1], edges[i] if i < len(edges) else None)


def _mean_sem(values: np.ndarray) -> dict[str, float | None]:
    # One target has no spread to measure: None (JSON null) rather than NaN, which JSON lacks.
    sem = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return {"mean": float(values.mean()), "sem": sem}


def summarize(per_target: dict[str, np.ndarray], gaps: np.ndarray, edges: tuple[int, ...]) -> dict[str, Any]:
    """Per-target scores -> overall and per non-empty gap bucket (in order of the gap)."""
    keys = [bucket_of(int(g), edges) for g in gaps]
    buckets = []
    for lo, hi in sorted(set(keys)):
        mask = np.array([k == (lo, hi) for k in keys])
        buckets.append({
            "gap_min": lo, "gap_max": hi, "count": int(mask.sum()), "mean_gap": float(gaps[mask].mean()),
            **{name: _mean_sem(v[mask]) for name, v in per_target.items()},
        })
    return {"count": len(gaps), **{name: _mean_sem(v) for name, v in per_target.items()}, "buckets": buckets}


def plot_protocol(results: dict[str, Any], protocol: str, path: Path) -> Path:
    """PSNR and SSIM against the gap (log axis), one line per model, the references dashed; each
    model's attention window (dotted) and its attention stack's reach (dash-dot) marked in its colour."""
    import matplotlib  # optional (docs/architecture.md); also pyplot must load after use("Agg")

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt  # after use("Agg") above
    import matplotlib.ticker  # with pyplot: optional, after use("Agg")

    block = results["protocols"][protocol]
    series = [(label, s, "-o") for label, s in block["models"].items()]
    series += [(f"{name} (reference)", s, "--") for name, s in block["references"].items()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, unit in zip(axes, ("psnr", "ssim"), (" (dB)", "")):
        colours = {}
        for label, s, style in series:
            x = [b["mean_gap"] for b in s["buckets"]]
            y = [b[metric]["mean"] for b in s["buckets"]]
            err = [b[metric]["sem"] or 0.0 for b in s["buckets"]]
            colours[label] = ax.errorbar(x, y, yerr=err, fmt=style, label=label, capsize=3).lines[0].get_color()
        for label, kind, gap in window_markers(results):
            ax.axvline(gap, color=colours.get(label, "grey"), linestyle=":" if kind == "window" else "-.",
                       linewidth=1, label=f"{label} {kind} ({gap})")
        ax.set_xscale("log")
        # Ticks at the buckets' mean gaps, in plain numbers (log-axis defaults read "6 x 10^0").
        ax.set_xticks(sorted({round(b["mean_gap"]) for _, s, _ in series for b in s["buckets"]}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("steps since the earlier visit (gap)")
        ax.set_ylabel(metric.upper() + unit)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # below the plots: the lines need the room
    rows = -(-len(labels) // 3)
    fig.set_size_inches(10, 4 + 0.22 * rows)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"{protocol}: {block['targets']} targets, context {results['config']['context']}, "
                 f"horizon {results['config']['horizon']}, gap > {results['qualifying_gap']}")
    fig.tight_layout(rect=(0, 0.22 * rows / (4 + 0.22 * rows) + 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ the evaluation
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def evaluate_memory(cfg: MemoryEvalConfig, progress: bool = False) -> dict[str, Any]:
    """Run the evaluation the config describes (module doc); a JSON-able dict of results."""
    cfg.validate()
    device = _device(cfg.device)
    store = EpisodeStore(cfg.dataset)
    models = {}
    for label, path in cfg.checkpoints.items():
        model, codec = load_dream_model(path, device=device)
        check_compatible(store, model.eval(), codec.eval())
        models[label] = (model, codec)
    windows = {label: attention_window(m.cfg) for label, (m, _) in models.items()}
    gap = qualifying_gap(cfg, windows)
    n_episodes = len(store) if cfg.episodes is None else min(cfg.episodes, len(store))

    length = cfg.context + cfg.horizon
    results: dict[str, Any] = {"config": asdict(cfg), "device": str(device), "attention_windows": windows,
                               "attention_reach": {label: attention_reach(m.cfg) for label, (m, _) in models.items()},
                               "qualifying_gap": gap, "protocols": {}}
    if cfg.window_only or cfg.foreign_past:  # context frames each model keeps from its own episode
        results["ablation_windows"] = {label: ablation_window(windows, label) for label in models}
    retention: dict[str, list] = {}
    results["state_retention"] = retention  # per model: its SSM heads' frames to 1/e (state_retention)
    start = time.perf_counter()
    try:
        plan = {}  # fails fast for every protocol before any compute
        for protocol in cfg.protocols:
            candidates = candidate_pairs(store, protocol, n_episodes, gap, cfg)
            plan[protocol] = (candidates, *select_targets(candidates, store.episode_steps, gap, cfg, protocol))
        for protocol, (candidates, targets, excluded) in plan.items():
            gaps = np.array([t.gap for t in targets])
            # (row label, model, context frames kept from its own episode, the rest from another one?)
            runs = [(label, label, None, False) for label in models]
            if cfg.window_only:
                runs += [(f"{label}, window only", label, kept, False) for label in models
                         if (kept := ablation_window(windows, label)) is not None]
            if cfg.foreign_past:
                donors = foreign_donors(targets)
                runs += [(f"{label}, foreign past", label, kept, True) for label in models
                         if (kept := ablation_window(windows, label)) is not None]
            model_scores: dict[str, dict[str, list]] = {row: {} for row, *_ in runs}
            ref_scores: dict[str, dict[str, list]] = {name: {} for name in REFERENCES}
            bar = tqdm(total=len(targets) * len(runs), desc=f"eval memory ({protocol})", unit="target",
                       disable=not progress, dynamic_ncols=True)
            for i in range(0, len(targets), cfg.batch_size):
                chunk = targets[i : i + cfg.batch_size]
                frames, actions = read_windows(store, [Window(t.episode, t.t_now - cfg.context, t.seed) for t in chunk],
                                               length)
                real = torch.as_tensor(frames[:, cfg.context :])
                if cfg.foreign_past:
                    lent = read_windows(store, [Window(d.episode, d.t_now - cfg.context, d.seed)
                                                for d in donors[i : i + cfg.batch_size]], cfg.context)
                for name, scores in reference_scores(frames, chunk, cfg.context).items():
                    for metric, v in scores.items():
                        ref_scores[name].setdefault(metric, []).append(v)
                for row, label, kept, foreign in runs:
                    model, codec = models[label]
                    cut = 0 if kept is None else cfg.context - min(kept, cfg.context)  # frames left out in front
                    if foreign:  # the same length of context, its first `cut` frames from the donors
                        seen, acts = splice_past(frames, actions, *lent, cut)
                    else:
                        seen, acts = frames[:, cut:], actions[:, cut:]
                    # The first full-context prefill also measures how long the model's SSM heads keep their state.
                    measure = kept is None and label not in retention
                    with SSMRetention(model) if measure else contextlib.nullcontext() as recorder:
                        dreamed = dream_targets(model, codec, seen, acts, seen.shape[1] - cfg.horizon,
                                                [t.seed for t in chunk], cfg.sampler_steps, cfg.prefill_chunk)
                    if measure:
                        retention[label] = recorder.summary()
                    for metric, v in frame_scores(real, dreamed).items():
                        model_scores[row].setdefault(metric, []).append(v)
                    bar.update(len(chunk))
            bar.close()
            results["protocols"][protocol] = {
                "candidates": len(candidates),
                "targets": len(targets),
                "excluded": excluded,
                "pairs": [[t.episode, t.t_now, t.t_before] for t in targets],
                "models": {label: summarize({m: np.concatenate(v) for m, v in s.items()}, gaps, cfg.gap_edges)
                           for label, s in model_scores.items()},
                "references": {name: summarize({m: np.concatenate(v) for m, v in s.items()}, gaps, cfg.gap_edges)
                               for name, s in ref_scores.items()},
            }
            def paired(a: str, b: str) -> dict[str, Any]:  # row a minus row b, per target
                return summarize({m: np.concatenate(model_scores[a][m]) - np.concatenate(model_scores[b][m])
                                  for m in model_scores[a]}, gaps, cfg.gap_edges)

            first, *others = models  # the first model minus each other one: the comparison
            results["protocols"][protocol]["first_minus"] = {label: paired(first, label) for label in others}
            if cfg.window_only:  # full context minus window only: the memory
                results["protocols"][protocol]["window_only_gain"] = {
                    label: paired(label, row) for row, label, kept, foreign in runs if kept is not None and not foreign}
            if cfg.foreign_past:  # full context minus a foreign past: the memory of this episode
                results["protocols"][protocol]["foreign_past_gain"] = {
                    label: paired(label, row) for row, label, _, foreign in runs if foreign}
    finally:
        store.close()
    results["seconds"] = time.perf_counter() - start
    results["plots"] = {}
    if cfg.out_dir is not None:
        out = Path(cfg.out_dir)
        for protocol in results["protocols"]:
            results["plots"][protocol] = str(plot_protocol(results, protocol, out / f"memory_{protocol}.png"))
        results["json"] = str(out / "memory.json")
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "memory.json.tmp"  # atomic: a crash never leaves half a results file
        tmp.write_text(json.dumps(results, indent=2, allow_nan=False))
        tmp.replace(out / "memory.json")
    return results


def _sem_text(sem: float | None) -> str:
    return "±  n/a" if sem is None else f"±{sem:.2f}"


def format_table(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [f"Memory on {cfg['dataset']} (context {cfg['context']}, horizon {cfg['horizon']}, gap > "
             f"{results['qualifying_gap']}, {cfg['sampler_steps']} sampler steps, seed {cfg['seed']})"]
    for protocol, block in results["protocols"].items():
        skipped = ", ".join(f"{k} {v}" for k, v in block["excluded"].items() if v)
        lines.append(f"  {protocol}: {block['targets']} targets of {block['candidates']} candidates"
                     + (f" (excluded: {skipped})" if skipped else ""))
        rows = {**block["models"], **{f"{k} (ref)": v for k, v in block["references"].items()}}
        first = next(iter(rows.values()))
        heads = [f"{b['gap_min']}-{'' if b['gap_max'] is None else b['gap_max']}" for b in first["buckets"]]
        lines.append(f"    {'PSNR / SSIM by gap':<24}" + "".join(f"{h:>16}" for h in heads) + f"{'all':>16}")
        for label, s in rows.items():
            cells = "".join(f"{b['psnr']['mean']:>10.2f} {b['ssim']['mean']:.3f}" for b in s["buckets"])
            lines.append(f"    {label:<24}{cells}{s['psnr']['mean']:>10.2f} {s['ssim']['mean']:.3f}")
        lines.append(f"    targets per bucket: {[b['count'] for b in first['buckets']]}")
        if "ablation_windows" in results:
            kept = ", ".join(f"{label} {w}" for label, w in results["ablation_windows"].items() if w)
            if "window_only_gain" in block:
                lines.append(f"    window only: the last context frames kept: {kept}")
            if "foreign_past_gain" in block:
                lines.append(f"    foreign past: the same context length, all but the last frames ({kept}) from another episode")
        refs = block["references"]
        if refs["earlier_visit"]["psnr"]["mean"] <= refs["copy_last"]["psnr"]["mean"]:
            hint = " (tighter --pos-tol / --dir-tol-deg)" if protocol == "retrieval" else ""
            lines.append("    note: replaying the earlier visit predicts no better than copying the last frame, so "
                         f"these targets leave little for memory to gain{hint}")
        first_label = next(iter(block["models"]))
        paired_rows = [*((f"{first_label} - {label}", gain) for label, gain in block.get("first_minus", {}).items()),
                       *((f"{label} full - window", gain) for label, gain in block.get("window_only_gain", {}).items()),
                       *((f"{label} full - foreign", gain) for label, gain in block.get("foreign_past_gain", {}).items())]
        for name, gain in paired_rows:
            cells = "".join(f"{b['psnr']['mean']:>+10.2f} {_sem_text(b['psnr']['sem'])}" for b in gain["buckets"])
            lines.append(f"    {name:<24}{cells}{gain['psnr']['mean']:>+10.2f} "
                         f"{_sem_text(gain['psnr']['sem'])}  (PSNR, paired; ± s.e.m.)")
    for label, layers in results.get("state_retention", {}).items():
        # A model without a window of its own is measured against the window it was compared at.
        lines.append(f"  state of {label}: {describe(layers, ablation_window(results['attention_windows'], label))}")
    for protocol, path in results["plots"].items():
        lines.append(f"  plot ({protocol}): {path}")
    if "json" in results:
        lines.append(f"  results: {results['json']}")
    lines.append(f"  {results['seconds']:.1f} s on {results['device']}")
    return "\n".join(lines)
