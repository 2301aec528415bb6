"""Plan in the dream, act in the real maze: model-predictive control with a world model.

    python examples/plan_in_memory_maze.py                                  # the bundled model, small settings
    python examples/plan_in_memory_maze.py --checkpoint runs/wm --planner mppi

What it shows. Each step, a planner (CEM, MPPI or random shooting, `worldsim.agents.planners`) forks
the model's live state into `--candidates` streams, dreams `--horizon` steps of candidate action
sequences in one batched model call per step and scores them with the model's predicted rewards.
The first action of the best plan is executed in the real Memory Maze, and the real next frame is
committed back into the model's state (`worldsim.agents.mpc`), so the model always holds the real
past. The same episodes (same maze seeds, same real context frames) are then played with uniformly
random actions. The table gives both returns (Memory Maze: +1 per target touched) and the planning
time per decision.

Scaling up. The defaults finish in a minute or two on one CPU core and are far too short for the
returns to say much: a 9x9 episode is 1000 steps and targets are rarely touched in a few dozen.
For a real comparison plan longer and wider over whole episodes, on a GPU if there is one:

    python examples/plan_in_memory_maze.py --horizon 8 --candidates 64 --iterations 3 \\
        --steps 1000 --episodes 10 --device cuda

which is `worldsim plan --planner cem --horizon 8 --candidates 64 --steps 1000 --episodes 10`. The
planners are only as good as the model's reward head: the bundled model is an early CPU checkpoint.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from worldsim.agents.mpc import compare_with_random
from worldsim.agents.planners import PLANNERS, PlannerConfig, make_planner
from worldsim.loading import default_checkpoint, load_dream_model
from worldsim.envs.memory_maze import MemoryMazeEnv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="world-model run or checkpoint folder (default: the bundled model)")
    parser.add_argument("--planner", default="cem", choices=list(PLANNERS))
    parser.add_argument("--horizon", type=int, default=4, help="dreamed steps per candidate action sequence")
    parser.add_argument("--candidates", type=int, default=16, help="action sequences dreamed in parallel")
    parser.add_argument("--iterations", type=int, default=2, help="sample-score-refit rounds (CEM / MPPI)")
    parser.add_argument("--steps", type=int, default=40, help="real steps controlled per episode")
    parser.add_argument("--episodes", type=int, default=2, help="real episodes, each also played randomly")
    parser.add_argument("--context-frames", type=int, default=9, help="real frames the model sees before planning")
    parser.add_argument("--maze-size", type=int, default=9, choices=(9, 11, 13, 15))
    parser.add_argument("--seed", type=int, default=0, help="fixes the mazes, the context and the planner's draws")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    # 1. The planner: how many sequences to dream, how far, how many refits.
    config = PlannerConfig(horizon=args.horizon, candidates=args.candidates, iterations=args.iterations,
                           elites=max(1, args.candidates // 8), sampler_steps=1)
    planner = make_planner(args.planner, config)

    # 2. The world model and its frame codec (the bundled model unless --checkpoint is given).
    checkpoint = args.checkpoint or default_checkpoint(args.maze_size)
    model, codec = load_dream_model(checkpoint, device=torch.device(args.device))

    # 3. MPC in the real maze, then uniformly random actions on the same seeds and context.
    env = MemoryMazeEnv(size=args.maze_size)
    try:
        result = compare_with_random(env, model, codec, planner, episodes=args.episodes, steps=args.steps,
                                     context_frames=args.context_frames, seed=args.seed)
    finally:
        env.close()

    # 4. The table: mean return per episode and planning time per decision.
    print(f"{args.episodes} episode(s) x {args.steps} steps in Memory Maze {args.maze_size}x{args.maze_size}, "
          f"{args.planner}: horizon {args.horizon}, {args.candidates} candidates, {args.iterations} iteration(s)")
    print(f"{'policy':<16}{'mean return':>12}{'per episode':>24}{'ms / decision':>16}")
    for name, label in (("planner", args.planner), ("random", "random")):
        r = result[name]
        per_episode = " ".join(f"{x:g}" for x in r["returns"])
        print(f"{label:<16}{np.mean(r['returns']):>12.2f}{per_episode:>24}{r['ms_per_decision']:>16.1f}")
    return result


if __name__ == "__main__":
    main()
