"""Held-out prediction PSNR against training steps: every checkpoint of a run through
`worldsim eval prediction`, written as JSON and plotted as a PNG.

    python scripts/learning_curve.py --run runs/mm9-direct:0:1000 --run runs/mm9-direct-hn:1000 \
        --dataset worldsim/mm9-heldout-v1 --every 1000 --start runs/bundle-old --out docs/learning_curve.png

--run FOLDER[:OFFSET[:LAST]] (repeatable) takes a run's checkpoints up to step LAST (those at a
multiple of --every, and the last one), plotted at OFFSET + step: a run warm-started from another
run's checkpoint continues its curve. --start adds the weights the first run was warm-started from
as the point at step 0. --frames plots against training frames instead (windows x frames per
window, read from each checkpoint's training config), for runs whose steps differ in size (a CPU
run's 8 x 16 frames against the GPU job's 256 x 32): each --run then continues from where the one
before it ended. --codec decodes every point with one codec (e.g. the bundle's, for runs that
recorded an older decoder). Results are cached in the JSON next to the PNG, so a re-run only
evaluates checkpoints it has not seen.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, action="append", help="`worldsim train` run folder[:offset[:last step]] (repeat)")
    p.add_argument("--dataset", required=True, help="held-out Minari dataset id or folder")
    p.add_argument("--start", default=None, help="checkpoint or bundle the run was warm-started from (step 0)")
    p.add_argument("--every", type=int, default=1000, help="evaluate checkpoints whose step is a multiple of this")
    p.add_argument("--horizon", type=int, default=16, help="open-loop frames per window")
    p.add_argument("--starts-per-episode", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("learning_curve.png"), help="PNG path (JSON beside it)")
    p.add_argument("--frames", action="store_true", help="x axis: training frames, each run continuing the one before")
    p.add_argument("--codec", default=None, help="codec checkpoint or bundle for every point (default: each model's own)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from worldsim.evaluation.prediction import PredictionEvalConfig, evaluate_prediction
    from worldsim.train.checkpoint import list_checkpoints, read_sidecar

    args = parse_args(argv)
    points: list[tuple[int, str]] = [] if args.start is None else [(0, args.start)]
    frames_before = 0  # --frames: training frames up to the checkpoint the next run starts from
    for spec in args.run:
        folder_s, _, rest = spec.partition(":")
        offset_s, _, last_s = rest.partition(":")
        offset, last = int(offset_s or 0), int(last_s) if last_s else None
        sidecars = [(read_sidecar(f), f) for f in list_checkpoints(folder_s)]
        taken = [(int(sc["step"]), f, sc) for sc, f in sidecars if last is None or int(sc["step"]) <= last]
        if not taken:
            continue
        train = taken[-1][2].get("train_config", {})
        frames_per_step = int(train.get("batch_size", 0)) * int(train.get("window", 0))
        if args.frames and not frames_per_step:
            print(f"error: {folder_s} records no batch_size and window; --frames needs them", file=sys.stderr)
            return 1
        for i, (step, folder, _) in enumerate(taken):
            if step % args.every == 0 or i == len(taken) - 1:
                points.append((frames_before + step * frames_per_step if args.frames else offset + step, str(folder)))
        frames_before += taken[-1][0] * frames_per_step
    if not points:
        print(f"error: no checkpoint of {args.run} at a multiple of {args.every} steps", file=sys.stderr)
        return 1
    cache_file = args.out.with_suffix(".json")
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    for step, path in points:
        key = f"{step}:{path}"
        if key in cache:
            continue
        cfg = PredictionEvalConfig(checkpoint=path, dataset=args.dataset, codec=args.codec, horizon=args.horizon,
                                   starts_per_episode=args.starts_per_episode, seed=args.seed, device="cpu")
        psnr = evaluate_prediction(cfg)["psnr"]
        cache[key] = {
            "step": step,
            "one_step": psnr["teacher_forced"]["at"]["1"],
            "open_loop_mean": psnr["open_loop"]["mean"],
            "copy_last_t1": psnr["copy_last"]["at"]["1"],
            "copy_last_mean": psnr["copy_last"]["mean"],
            "codec_t1": psnr["codec"]["at"]["1"],
        }
        print(f"step {step:>6}: 1-step {cache[key]['one_step']:.2f} dB, open loop mean {cache[key]['open_loop_mean']:.2f} dB")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache, indent=1))
    rows = sorted(cache.values(), key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.plot(steps, [r["one_step"] for r in rows], "o-", label="1-step, teacher-forced (t=1)")
    ax.plot(steps, [r["open_loop_mean"] for r in rows], "s-", label=f"open loop, mean of {args.horizon}")
    ax.axhline(rows[-1]["codec_t1"], color="grey", ls=":", label="codec ceiling (t=1)")
    ax.axhline(rows[-1]["copy_last_t1"], color="C0", ls="--", lw=0.8, label="copy last frame (t=1)")
    ax.axhline(rows[-1]["copy_last_mean"], color="C1", ls="--", lw=0.8, label=f"copy last frame (mean of {args.horizon})")
    if args.frames:
        ax.set_xscale("symlog", linthresh=max(1, min((x for x in steps if x > 0), default=1)))
        ax.set_xlim(left=0)
    ax.set_xlabel("training frames since the warm start" if args.frames else "training steps since the warm start")
    ax.set_ylabel("held-out PSNR (dB)")
    ax.set_title(f"held-out prediction on {args.dataset}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, 0.9))  # under the ceiling, above the curves
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out} and {cache_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
