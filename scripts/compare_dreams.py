"""Real vs dream, side by side at chosen frames, for one or more world models: a PNG for the README.

    python scripts/compare_dreams.py --model "before=runs/bundle-old,sigma_max=5" --model now=worldsim/assets/dream-memory-maze-9x9 \
        --frames 1,10,50,200,990 --seed 7 --out docs/dream_comparison.png

The real 9x9 maze runs a random walk (persistence 0.8, seeded); every model gets the same real
context (its first --context frames) and dreams the rest open loop from the same actions. Rows:
the real maze, then each model; columns: the chosen dreamed frame numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True,
                   help="LABEL=PATH[,steps=N,churn=C,sigma_max=X,sigma_min=Y] of a checkpoint or bundle, with "
                        "optional sampler settings (default: the dream's) (repeat)")
    p.add_argument("--frames", default="1,10,50,200,990",
                   help="dreamed frame numbers to show (a 9x9 maze episode ends at step 1000, context included)")
    p.add_argument("--context", type=int, default=9, help="real frames given to the models first")
    p.add_argument("--seed", type=int, default=7, help="maze, actions and sampler noise")
    p.add_argument("--sampler-steps", type=int, default=None, help="denoiser calls per frame (default: the dream's)")
    p.add_argument("--scale", type=int, default=3, help="pixel upscaling in the PNG")
    p.add_argument("--out", type=Path, default=Path("dream_comparison.png"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import gymnasium as gym
    import torch
    from PIL import Image, ImageDraw

    import worldsim.envs  # noqa: F401 (registers the ids)
    from worldsim.loading import load_dream_model
    from worldsim.evaluation.realism import random_walk_actions
    from worldsim.rollout.session import DREAM_STEPS, RolloutSession

    args = parse_args(argv)
    shown = [int(f) for f in args.frames.split(",")]
    steps = max(shown)
    models = []
    for spec in args.model:
        label, _, rest = spec.partition("=")
        path, *settings = rest.split(",")
        sampler = {k: float(v) for k, _, v in (item.partition("=") for item in settings)}
        steps_of_model = int(sampler.pop("steps", args.sampler_steps or DREAM_STEPS))
        models.append((label, path, steps_of_model, sampler))
    rng = np.random.default_rng(args.seed)
    actions = random_walk_actions(6, 1, args.context - 1 + steps, 0.8, rng)[0]

    env = gym.make("worldsim/MemoryMaze-9x9-v0")
    obs, _ = env.reset(seed=args.seed)
    real = [obs]
    for a in actions:
        obs, *_ = env.step(int(a))
        real.append(obs)
    env.close()
    real = np.stack(real)  # (context + steps, H, W, 3)

    rows = [("real", [real[args.context - 1 + f] for f in shown])]
    for label, path, sampler_steps, sampler in models:
        model, codec = load_dream_model(path)
        session = RolloutSession(model, codec, batch=1, sampler_steps=sampler_steps, sampler_kwargs=sampler)
        session.reset(real[None, : args.context], actions[None, : args.context - 1], seeds=[args.seed])
        kept = {}
        with torch.no_grad():
            for t in range(1, steps + 1):
                out = session.step(actions[None, args.context - 2 + t], decode=t in shown)
                if t in shown:
                    kept[t] = out.frames[0].numpy()
        rows.append((label, [kept[f] for f in shown]))

    h, w = real.shape[1:3]
    s, label_w, head = args.scale, 90, 18
    sheet = Image.new("RGB", (label_w + len(shown) * w * s, head + len(rows) * h * s), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, f in enumerate(shown):
        draw.text((label_w + j * w * s + 4, 3), f"frame {f}", fill=(0, 0, 0))
    for i, (label, frames) in enumerate(rows):
        y = head + i * h * s
        draw.text((4, y + h * s // 2 - 6), label, fill=(0, 0, 0))
        for j, frame in enumerate(frames):
            sheet.paste(Image.fromarray(frame).resize((w * s, h * s), Image.NEAREST), (label_w + j * w * s, y))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
