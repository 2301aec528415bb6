"""Build the bundled default model from a training run (see `worldsim.bundled` for the format).

    python scripts/bundle_model.py --checkpoint runs/mm9-cpu --dataset worldsim/mm9-codec-v0 \
        --clips 4 --clip-frames 9 [--codec PATH] [--weights ema] [--dtype float16] \
        [--metrics metrics.json] [--out DIR]

Writes worldsim/assets/dream-memory-maze-9x9/ (or --out, or $WORLDSIM_BUNDLE_DIR), replacing the
previous bundle in place and atomically, then prints its size. The one bundle is meant to stay
small (tens of MB) and to be replaced, never accumulated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from worldsim import bundled
from worldsim.train.bundle_export import bundle_from_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="world-model checkpoint folder or `worldsim train` run folder")
    p.add_argument("--dataset", required=True, help="Minari dataset id or folder to take the context clips from")
    p.add_argument("--codec", default=None, help="codec checkpoint (default: the one the checkpoint records)")
    p.add_argument("--clips", type=int, default=4, help="number of context clips to ship")
    p.add_argument("--clip-frames", type=int, default=9, help="frames per clip (>= the model's attention window)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights to ship")
    p.add_argument("--dtype", choices=sorted(bundled.STORE_DTYPES), default="float16",
                   help="storage dtype of the weights (loaded back as float32)")
    p.add_argument("--maze-size", type=int, default=9, help="Memory Maze size the model was trained on")
    p.add_argument("--metrics", type=Path, default=None, help="JSON file of measured metrics to record")
    p.add_argument("--seed", type=int, default=0, help="picks the clips")
    p.add_argument("--out", type=Path, default=None, help="bundle folder (default: the package's, or $WORLDSIM_BUNDLE_DIR)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    metrics = None
    if args.metrics is not None:
        try:
            metrics = json.loads(args.metrics.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: --metrics {args.metrics}: {e}", file=sys.stderr)
            return 2
        if not isinstance(metrics, dict):
            print(f"error: --metrics {args.metrics} must hold a JSON object", file=sys.stderr)
            return 2
    out = args.out if args.out is not None else bundled.bundle_location()
    try:
        folder = bundle_from_checkpoint(
            args.checkpoint, out, dataset=args.dataset, codec=args.codec, clips=args.clips,
            clip_frames=args.clip_frames, weights=args.weights, dtype=args.dtype, maze_size=args.maze_size,
            metrics=metrics, seed=args.seed,
        )
    except (ValueError, FileNotFoundError) as e:  # BundleError and both CheckpointErrors are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    for f in sorted(folder.iterdir()):
        print(f"  {f.name:20s} {f.stat().st_size / 2**20:8.2f} MiB")
    print(f"wrote {folder}: {bundled.bundle_bytes(folder) / 2**20:.2f} MiB in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
