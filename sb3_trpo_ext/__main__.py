"""``python -m sb3_trpo_ext``: train TRPO on an environment (CartPole-v1 by default) and print its evaluation."""

from __future__ import annotations

import argparse
import os
import time

import gymnasium as gym
import torch as th
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.preprocessing import is_image_space

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


def policy_for(observation_space: spaces.Space) -> str:
    """The policy an SB3 user picks for these observations: MultiInputPolicy (Dict), CnnPolicy (images), MlpPolicy."""
    if isinstance(observation_space, spaces.Dict):
        return "MultiInputPolicy"
    return "CnnPolicy" if is_image_space(observation_space) else "MlpPolicy"


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
        help="Gymnasium environment id (CartPole-v1 trains with the RL Zoo's tuned settings, any other with TRPO's defaults"
        " and the policy its observations need: MultiInputPolicy for Dict, CnnPolicy for images, else MlpPolicy)",
    )
    parser.add_argument("--timesteps", type=float, default=1e5, help="training budget in environment steps")
    parser.add_argument("--n-envs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of training (environment i: seed + i) and evaluation")
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
    if not 0 <= args.seed <= 2**32 - args.n_envs:  # Gymnasium's seeds are 32-bit, one per environment from --seed on
        parser.error(f"--seed must be an integer in [0, 2**32 - n_envs] = [0, {2**32 - args.n_envs}], got {args.seed}")
    if args.save and os.path.isdir(args.save):
        parser.error(f"--save {args.save}: is a folder; give a file path (SB3 adds .zip)")
    if args.save:  # SB3's save creates missing folders: the nearest existing one must be a writable folder
        existing = os.path.dirname(os.path.abspath(args.save))
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not (os.path.isdir(existing) and os.access(existing, os.W_OK)):
            parser.error(f"--save {args.save}: {existing} is not a writable folder (checked before training)")
    if args.threads > 0:
        th.set_num_threads(args.threads)

    settings = CARTPOLE_SETTINGS if args.env == "CartPole-v1" else {}
    try:
        env = make_vec_env(args.env, n_envs=args.n_envs, seed=args.seed)
        policy = policy_for(env.observation_space)
        model = TRPO(policy, env, seed=args.seed, **settings)  # type: ignore[arg-type]
    except gym.error.Error as error:  # not registered, its package not installed, ...
        parser.error(f"--env {args.env}: {type(error).__name__}: {error}")
    except ValueError as error:  # a space TRPO does not handle, named in the message
        parser.error(f"--env {args.env}: {error}")
    threads = th.get_num_threads()
    rollout = model.n_steps * env.num_envs
    print(
        f"sb3_trpo_ext {__version__}: training TRPO ({policy}) on {args.env} for {int(args.timesteps)} steps, in whole "
        f"rollouts of {rollout} (torch on {threads} thread{'s' if threads > 1 else ''})"
    )
    start = time.perf_counter()
    model.learn(args.timesteps, progress_bar=not args.no_progress_bar)
    elapsed = time.perf_counter() - start
    if args.save:
        model.save(args.save)
    eval_env = make_vec_env(args.env, n_envs=1, seed=(args.seed + 1000) % 2**32)
    mean_return, std_return = evaluate_policy(model, eval_env, n_eval_episodes=args.eval_episodes, deterministic=True)
    print(
        f"Evaluation on {args.env}: mean return {mean_return:.1f} +/- {std_return:.1f} over {args.eval_episodes} "
        f"deterministic episodes (trained in {elapsed:.0f} s, {model.num_timesteps / elapsed:.0f} steps/s)"
    )
    return float(mean_return)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
