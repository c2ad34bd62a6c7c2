"""``python -m sb3_trpo_ext``: train TRPO on an environment (CartPole-v1 by default) and print its evaluation."""

from __future__ import annotations

import argparse
import os
import time

import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_trpo_ext import TRPO, __version__

# The RL Zoo's tuned TRPO settings for CartPole-v1 (rl_zoo3 2.9.2, hyperparams/trpo.yml)
CARTPOLE_SETTINGS = {
    "n_steps": 512,
    "batch_size": 512,
    "cg_damping": 1e-3,
    "gae_lambda": 0.98,
    "gamma": 0.99,
    "learning_rate": 1e-3,
    "n_critic_updates": 20,
}


def main(argv: list[str] | None = None) -> float:
    """
    Train and evaluate.

    :param argv: Command-line arguments (``sys.argv[1:]`` when ``None``)
    :return: Mean evaluation return
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--env",
        default="CartPole-v1",
        help="Gymnasium environment id (CartPole-v1 trains with the RL Zoo's tuned settings, any other with TRPO's defaults)",
    )
    parser.add_argument("--timesteps", type=float, default=1e5, help="training budget in environment steps")
    parser.add_argument("--n-envs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--save", default=None, help="where to save the trained model (.zip)")
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the small networks of these tasks run fastest on one, and several threads slow "
        "down badly on a machine that is busy with other work); 0 keeps torch's default",
    )
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if not 1 <= args.timesteps < float("inf"):
        parser.error(f"--timesteps must be a finite number >= 1, got {args.timesteps}")
    if args.n_envs < 1:
        parser.error(f"--n-envs must be >= 1, got {args.n_envs}")
    if args.eval_episodes < 1:
        parser.error(f"--eval-episodes must be >= 1, got {args.eval_episodes}")
    if args.save:  # SB3's save creates missing folders: the nearest existing one must be a writable folder
        existing = os.path.dirname(os.path.abspath(args.save))
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not (os.path.isdir(existing) and os.access(existing, os.W_OK)):
            parser.error(f"--save {args.save}: {existing} is not a writable folder (checked before training)")
    if args.threads > 0:
        th.set_num_threads(args.threads)

    settings = CARTPOLE_SETTINGS if args.env == "CartPole-v1" else {}
    env = make_vec_env(args.env, n_envs=args.n_envs, seed=args.seed)
    model = TRPO("MlpPolicy", env, seed=args.seed, **settings)  # type: ignore[arg-type]
    threads = th.get_num_threads()
    print(
        f"sb3_trpo_ext {__version__}: training TRPO on {args.env} for {int(args.timesteps)} steps "
        f"(torch on {threads} thread{'s' if threads > 1 else ''})"
    )
    start = time.perf_counter()
    model.learn(args.timesteps, progress_bar=not args.no_progress_bar)
    elapsed = time.perf_counter() - start
    if args.save:
        model.save(args.save)
    eval_env = make_vec_env(args.env, n_envs=1, seed=args.seed + 1000)
    mean_return, std_return = evaluate_policy(model, eval_env, n_eval_episodes=args.eval_episodes, deterministic=True)
    print(
        f"Evaluation on {args.env}: mean return {mean_return:.1f} +/- {std_return:.1f} over {args.eval_episodes} "
        f"deterministic episodes (trained in {elapsed:.0f} s, {model.num_timesteps / elapsed:.0f} steps/s)"
    )
    return float(mean_return)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
