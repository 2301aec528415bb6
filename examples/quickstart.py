"""Dream in Memory Maze with a trained world model: the real env and the dream side by side.

    python examples/quickstart.py --checkpoint runs/wm --steps 100 --out dream.mp4

The same as `worldsim dream`, as a library call: the live maze is reset with the seed, a random
walk drives it for the context frames, then the model dreams while the real env takes the same
actions. Prints the dream's frames/s and per-step latency.
"""

import argparse

from worldsim.dream import DreamConfig, NoModelError, dream, format_result

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--checkpoint", help="world-model run or checkpoint folder (train one with `worldsim train`)")
parser.add_argument("--codec", help="codec checkpoint (default: the one the world model records)")
parser.add_argument("--steps", type=int, default=50, help="frames to dream")
parser.add_argument("--sampler-steps", type=int, default=4, help="denoiser calls per frame")
parser.add_argument("--out", default="dream.mp4", help="video file, .mp4 or .gif")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

config = DreamConfig(checkpoint=args.checkpoint, codec=args.codec, context="memory-maze", policy="random",
                     steps=args.steps, sampler_steps=args.sampler_steps, out=args.out, seed=args.seed)
try:
    result = dream(config)
except NoModelError as e:  # no --checkpoint and no bundled model: say how to get one
    parser.error(str(e))
print(format_result(result))
