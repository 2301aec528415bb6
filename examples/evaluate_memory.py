"""Does a world model remember? Score its predictions of places it saw longer ago than it can attend.

    python examples/evaluate_memory.py                       # the bundled model on 4 freshly collected episodes
    python examples/evaluate_memory.py --checkpoint lssvwm=runs/wm --checkpoint causal_window=runs/wm-cw \\
        --dataset worldsim/mm9-heldout-v0

What it shows. A target is a step where the agent is back at a pose it last had `gap` steps
earlier, with the gap longer than every model's attention window: only memory carried past the
window (the SSM state) can predict the view. Each model sees `--context` real frames up to the
return, then dreams `--horizon` frames open loop from the true actions; the PSNR / SSIM of those
frames against the real ones are reported per gap bucket, next to two model-free references:
"copy_last" (the last context frame: a model without memory that predicts "nothing moves") and
"earlier_visit" (the frames of the earlier visit: what recalling the old view would score). Two
protocols pick the targets: "revisits" (pairs recorded in each episode's metadata at collection) and
"retrieval" (returns found in the recorded poses). `worldsim eval memory` runs the same evaluation;
`worldsim/evaluation/memory.py` has the details.

Data. `--dataset` takes a Minari dataset id (or folder) of held-out episodes. Without one, the
example first collects `--collect` episodes of the revisit exploration policy (walk to a pose,
wander 100-500 steps, come back to it) into a temporary folder; with one, `--collect N` first
tops that dataset up to N episodes (collection resumes; it is `worldsim collect --policy revisit`).
Collected episodes use seeds from `--collect-seed` on (9000: neither the bundled model's training
episodes, seeds 1000-1029, nor its held-out ones, 5000-5002).

Scaling up. The defaults take about 2 minutes on one CPU core: 4 episodes of 500 steps, a 200-frame
context, at most 24 targets per protocol (about 15-20 qualify), so each bucket holds a handful of
targets and its standard error is large. For numbers worth reporting, collect full 1000-step
episodes once and evaluate all their targets with a longer context:

    worldsim collect --policy revisit --episodes 20 --seed 9000 --dataset-id worldsim/mm9-revisit-test-v0
    python examples/evaluate_memory.py --checkpoint lssvwm=runs/wm --checkpoint causal_window=runs/wm-cw \\
        --dataset worldsim/mm9-revisit-test-v0 --context 400 --max-targets 0 --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from worldsim.collect import CollectConfig, collect
from worldsim.loading import default_checkpoint
from worldsim.evaluation.memory import PROTOCOLS, MemoryEvalConfig, evaluate_memory, format_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", metavar="LABEL=PATH",
                        help="a world model to evaluate, repeatable (default: bundled=<the bundled model>)")
    parser.add_argument("--dataset", help="Minari dataset id (looked up in MINARI_DATASETS_PATH) or folder of "
                                          "held-out episodes (default: collect some)")
    parser.add_argument("--collect", type=int, metavar="N",
                        help="first collect revisit-policy episodes up to N (default: 4 without --dataset, else 0)")
    parser.add_argument("--collect-steps", type=int, default=500, help="steps per collected episode")
    parser.add_argument("--collect-seed", type=int, default=9000, help="collected episode i uses seed SEED + i")
    parser.add_argument("--maze-size", type=int, default=9, choices=(9, 11, 13, 15))
    parser.add_argument("--protocol", action="append", choices=PROTOCOLS, help="repeatable (default: both)")
    parser.add_argument("--context", type=int, default=200,
                        help="real frames before the return; the earlier visit must lie within")
    parser.add_argument("--horizon", type=int, default=8, help="frames dreamed open loop from the return")
    parser.add_argument("--min-gap", type=int, help="targets need gap > this (default: the widest attention window)")
    parser.add_argument("--max-targets", type=int, default=24, help="seeded subset per protocol; 0: all targets")
    parser.add_argument("--sampler-steps", type=int, default=4, help="denoiser calls per dreamed frame")
    parser.add_argument("--seed", type=int, default=0, help="fixes the target subset and the sampler noise")
    parser.add_argument("--out-dir", default="out/memory", help="memory.json and one PNG per protocol go here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    return parser.parse_args(argv)


def labelled(specs: list[str] | None, maze_size: int) -> dict[str, str]:
    """["lssvwm=runs/a", "runs/b"] -> {"lssvwm": "runs/a", "b": "runs/b"}; none: the bundled model."""
    if not specs:
        return {"bundled": str(default_checkpoint(maze_size))}
    out = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).name, spec
        out[label] = path
    return out


def collect_revisits(dataset_id: str, root: str | None, episodes: int, args: argparse.Namespace) -> str:
    """Collect (or top up) `episodes` revisit-policy episodes -> the dataset's folder."""
    summary = collect(CollectConfig(
        env_id=f"worldsim/MemoryMaze-{args.maze_size}x{args.maze_size}-v0", policy="revisit", episodes=episodes,
        workers=1, max_steps=args.collect_steps, seed=args.collect_seed, dataset_id=dataset_id, root=root))
    print(f"collected {summary.episodes_written} episode(s) ({summary.steps_written} steps, "
          f"{summary.seconds:.0f} s); {summary.path} holds {summary.episodes_in_dataset}")
    return str(summary.path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    checkpoints = labelled(args.checkpoint, args.maze_size)
    n_collect = args.collect if args.collect is not None else (0 if args.dataset else 4)

    with tempfile.TemporaryDirectory(prefix="worldsim-memory-") as tmp:
        # 1. Held-out episodes with revisits: the given dataset, topped up or freshly collected.
        dataset = args.dataset
        if n_collect > 0 and dataset is None:
            dataset = collect_revisits("worldsim/revisit-heldout-v0", tmp, n_collect, args)
        elif n_collect > 0:
            dataset = collect_revisits(dataset, None, n_collect, args)

        # 2. The evaluation: every model on the same targets with the same noise, then the references.
        config = MemoryEvalConfig(
            checkpoints=checkpoints, dataset=dataset, protocols=tuple(args.protocol or PROTOCOLS),
            context=args.context, horizon=args.horizon, min_gap=args.min_gap,
            max_targets=args.max_targets or None, sampler_steps=args.sampler_steps, seed=args.seed,
            out_dir=args.out_dir, device=args.device)
        results = evaluate_memory(config, progress=True)

    # 3. PSNR / SSIM per gap bucket for each model and reference; the same numbers are in memory.json.
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
