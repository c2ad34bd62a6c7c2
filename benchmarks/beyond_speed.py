"""
Per-step wall time of MaskableTRPO and RecurrentTRPO against this package's TRPO on the same task.

* masking: sb3-contrib's ``InvalidActionEnvDiscrete(dim=70, n_invalid_actions=55)``; TRPO runs on it without masks.
* recurrent: CartPole-v1 without velocities (8 envs); TRPO with an MLP of the same width, and sb3-contrib's
  RecurrentPPO (same LSTM) for the cost of an LSTM policy elsewhere.

Time per environment step = wall time of ``learn(total)`` / ``total`` (rollouts and updates together), after a
warm-up ``learn``; best of ``--repeats``. One torch thread.

Usage: ``python benchmarks/beyond_speed.py [--steps 8192] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch as th
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env

from sb3_trpo_ext import TRPO, MaskableTRPO, RecurrentTRPO


class NoVelocityObservation(gym.ObservationWrapper):
    """CartPole with the cart position and the pole angle only."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        low, high = env.observation_space.low, env.observation_space.high  # type: ignore[attr-defined]
        self.observation_space = gym.spaces.Box(low[[0, 2]], high[[0, 2]], dtype=np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation[[0, 2]]


def cartpole_no_velocity() -> gym.Env:
    return NoVelocityObservation(gym.make("CartPole-v1"))


def per_step_ms(make_model: Callable[[], BaseAlgorithm], steps: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        model = make_model()
        model.learn(steps // 4)  # warm-up: first calls, structure discovery
        start = time.perf_counter()
        model.learn(steps, reset_num_timesteps=False)
        best = min(best, (time.perf_counter() - start) / steps * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    th.set_num_threads(1)

    masked_kwargs = {"n_steps": 128, "batch_size": 64, "gamma": 0.4, "target_kl": 0.1, "cg_damping": 0.01, "seed": 0}
    recurrent_kwargs = {"n_steps": 64, "batch_size": 128, "target_kl": 0.02, "gamma": 0.98, "seed": 0}

    def masked_env() -> gym.Env:
        return InvalidActionEnvDiscrete(dim=70, n_invalid_actions=55)

    cases: dict[str, dict[str, Callable[[], BaseAlgorithm]]] = {
        "masking (InvalidActionEnvDiscrete 70/55)": {
            "TRPO": lambda: TRPO("MlpPolicy", masked_env(), **masked_kwargs),  # type: ignore[arg-type]
            "MaskableTRPO": lambda: MaskableTRPO("MlpPolicy", masked_env(), **masked_kwargs),  # type: ignore[arg-type]
        },
        "recurrent (CartPole no velocity, 8 envs)": {
            "TRPO": lambda: TRPO(
                "MlpPolicy",
                make_vec_env(cartpole_no_velocity, n_envs=8, seed=0),
                policy_kwargs={"net_arch": [32, 32]},
                **recurrent_kwargs,  # type: ignore[arg-type]
            ),
            "RecurrentTRPO": lambda: RecurrentTRPO(
                "MlpLstmPolicy",
                make_vec_env(cartpole_no_velocity, n_envs=8, seed=0),
                policy_kwargs={"net_arch": [32], "lstm_hidden_size": 32},
                **recurrent_kwargs,  # type: ignore[arg-type]
            ),
            "RecurrentPPO (sb3-contrib)": lambda: RecurrentPPO(
                "MlpLstmPolicy",
                make_vec_env(cartpole_no_velocity, n_envs=8, seed=0),
                n_steps=64,
                batch_size=128,
                n_epochs=10,
                seed=0,
                policy_kwargs={"net_arch": [32], "lstm_hidden_size": 32},
            ),
        },
    }
    for task, models in cases.items():
        print(f"\n{task}: ms per environment step (best of {args.repeats}, {args.steps} steps)")
        baseline = None
        for name, make_model in models.items():
            ms = per_step_ms(make_model, args.steps, args.repeats)
            baseline = ms if baseline is None else baseline
            print(f"  {name:28s} {ms:8.4f}   x{ms / baseline:.2f} vs TRPO")


if __name__ == "__main__":
    main()
