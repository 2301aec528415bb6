"""Train PPO inside the bundled world model's dream, then play it in the real Memory Maze.

    python examples/train_ppo_in_dream.py --steps 3000

The agent never sees the real maze while it learns: every frame and reward it trains on is
dreamed by the world model (8 streams in one batch), starting from a few real context frames.
Afterwards it plays real 9x9 mazes, and a uniformly random policy plays the same mazes, so the
table says whether anything learned in imagination transfers. With the bundled CPU-trained
model and a few thousand steps, expect little: this is the plumbing, at a size a CPU runs in a
few minutes (random walks rarely touch a target in 200 steps either: --max-steps 1000 plays
whole episodes). `worldsim agent train --world real` trains the same agent in the real maze for
comparison.
"""

import argparse

from worldsim.agents.imagination import AgentTrainConfig, compare_with_random, format_comparison, train_agent


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="world-model run or checkpoint folder (default: the bundled model)")
    parser.add_argument("--steps", type=int, default=3000, help="env steps of PPO in the dream")
    parser.add_argument("--num-envs", type=int, default=8, help="dream streams stepped in one batch")
    parser.add_argument("--horizon", type=int, default=100, help="dreamed steps per training episode")
    parser.add_argument("--episodes", type=int, default=3, help="real evaluation episodes (agent and random)")
    parser.add_argument("--max-steps", type=int, default=200, help="steps per real evaluation episode")
    parser.add_argument("--context-mazes", type=int, default=8, help="real mazes walked for context frames")
    parser.add_argument("--run-dir", default="runs/ppo-dream", help="checkpoints and TensorBoard logs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = AgentTrainConfig(
        run_dir=args.run_dir, world="dream", checkpoint=args.checkpoint, algo="ppo", steps=args.steps,
        num_envs=args.num_envs, horizon=args.horizon, context_mazes=args.context_mazes,
        eval_episodes=0,  # scored once below, against random, instead of during training
        seed=args.seed, progress=True,
    )
    try:
        result = train_agent(config)
    except ValueError as e:  # no bundled model and no --checkpoint, or a run dir already used
        parser.error(str(e))
    print(f"trained {result['num_timesteps']} dream steps at {result['env_steps_per_s']:.1f} env steps/s")

    scores = compare_with_random(args.run_dir, episodes=args.episodes, max_steps=args.max_steps, seed=args.seed)
    print(format_comparison(scores))
    return scores


if __name__ == "__main__":
    main()
