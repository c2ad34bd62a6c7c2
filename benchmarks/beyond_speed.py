"""
Per-step wall time of ``MaskableTRPO`` and ``RecurrentTRPO`` against this package's ``TRPO`` on the same task, in
the same run, CPU, torch on one thread.

* ``masking``: sb3-contrib's ``InvalidActionEnvDiscrete(dim=70, n_invalid_actions=55)``; ``TRPO`` runs on it
  without masks (the environment's own ``action_masks()`` is part of ``MaskableTRPO``'s time).
* ``recurrent``: CartPole-v1 without velocities, 8 environments; ``TRPO`` with an MLP of the same width, and
  sb3-contrib's ``RecurrentPPO`` (same LSTM) for the cost of an LSTM policy elsewhere.

Time per environment step = wall time of ``learn(steps)`` / ``steps`` (rollouts and updates together), after a
warm-up ``learn(steps // 4)`` on the same model; it is also split into the updates (``train()``, timed by wrapping
the method on the instance) and the rest (rollouts, logging). The variants of a task are alternated within each pair
(one warm-up pair, then ``--pairs`` measured ones); the ratio to ``TRPO`` is taken within a pair, then min / median /
max.
Writes ``<out>/<name>/beyond.json``; ``python -m benchmarks.report`` turns it into the README's table.

Usage::

    python -m benchmarks.beyond_speed                  # about 5 minutes on a 2-core machine
    python -m benchmarks.beyond_speed --smoke --out /tmp/beyond-smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env

from benchmarks.common import RESULTS_DIR, timestamp, versions, write_json
from benchmarks.speed import TrainTimer

DEFAULT_OUT = RESULTS_DIR / "beyond"
#: The variant every other one of a task is compared with.
BASELINE = "TRPO"


class NoVelocityObservation(gym.ObservationWrapper):
    """CartPole with the cart position and the pole angle only."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        low, high = env.observation_space.low, env.observation_space.high  # type: ignore[attr-defined]
        self.observation_space = gym.spaces.Box(low[[0, 2]], high[[0, 2]], dtype=np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation[[0, 2]]


def cartpole_no_velocity() -> gym.Env:
    """CartPole-v1 without the velocities: solving it needs memory."""
    return NoVelocityObservation(gym.make("CartPole-v1"))


def tasks() -> dict[str, dict[str, Callable[[], BaseAlgorithm]]]:
    """
    :return: per task, the model constructors of its variants (the baseline first).
    """
    from sb3_contrib import RecurrentPPO
    from sb3_contrib.common.envs import InvalidActionEnvDiscrete

    from sb3_trpo_ext import TRPO, MaskableTRPO, RecurrentTRPO

    masked_kwargs: dict[str, Any] = {
        "n_steps": 128,
        "batch_size": 64,
        "gamma": 0.4,
        "target_kl": 0.1,
        "cg_damping": 0.01,
        "seed": 0,
    }
    recurrent_kwargs: dict[str, Any] = {"n_steps": 64, "batch_size": 128, "target_kl": 0.02, "gamma": 0.98, "seed": 0}
    lstm = {"net_arch": [32], "lstm_hidden_size": 32}

    def masked_env() -> gym.Env:
        return InvalidActionEnvDiscrete(dim=70, n_invalid_actions=55)

    def memory_env() -> Any:
        return make_vec_env(cartpole_no_velocity, n_envs=8, seed=0)

    return {
        "masking: InvalidActionEnvDiscrete(70, 55)": {
            BASELINE: lambda: TRPO("MlpPolicy", masked_env(), **masked_kwargs),
            "MaskableTRPO": lambda: MaskableTRPO("MlpPolicy", masked_env(), **masked_kwargs),
        },
        "recurrent: CartPole-v1 without velocities, 8 envs": {
            BASELINE: lambda: TRPO("MlpPolicy", memory_env(), policy_kwargs={"net_arch": [32, 32]}, **recurrent_kwargs),
            "RecurrentTRPO": lambda: RecurrentTRPO("MlpLstmPolicy", memory_env(), policy_kwargs=lstm, **recurrent_kwargs),
            "RecurrentPPO (sb3-contrib)": lambda: RecurrentPPO(
                "MlpLstmPolicy", memory_env(), n_steps=64, batch_size=128, n_epochs=10, seed=0, policy_kwargs=lstm
            ),
        },
    }


def ms_per_step(make_model: Callable[[], BaseAlgorithm], steps: int) -> tuple[float, float]:
    """
    :param make_model: builds a fresh model.
    :param steps: measured environment steps.
    :return: milliseconds per environment step of ``learn(steps)`` after a warm-up ``learn``, and of the ``train()``
        calls (updates) within it; per step taken (``learn`` runs whole rollouts, so it may take more than ``steps``).
    """
    model = make_model()
    model.learn(max(steps // 4, 1))  # warm-up: first calls, structure discovery
    timer = TrainTimer(model)
    before = model.num_timesteps
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    elapsed = time.perf_counter() - start
    taken = model.num_timesteps - before
    return elapsed / taken * 1e3, sum(timer.times) / taken * 1e3


def measure(steps: int, pairs: int) -> list[dict[str, Any]]:
    """
    :param steps: measured environment steps per run.
    :param pairs: measured rounds per task (after one warm-up round).
    :return: one row per run.
    """
    rows = []
    for task, variants in tasks().items():
        for pair in range(-1, pairs):
            for variant, make_model in variants.items():
                ms, train_ms = ms_per_step(make_model, steps)
                rows.append(
                    {
                        "task": task,
                        "variant": variant,
                        "pair": pair,
                        "warmup": pair < 0,
                        "steps": steps,
                        "ms": ms,
                        "train_ms": train_ms,
                    }
                )
                print(f"{task:50s} {variant:28s} pair {pair:2d}: {ms:.4f} ms per env step, train() {train_ms:.4f}")
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """
    :param rows: the rows of :func:`measure`.
    :return: per task and variant: median ``ms`` per step, and ``ratio`` to the baseline of the same pair as
        ``(min, median, max)``; the same split into ``train()`` (``train_ms``, ``train_ratio``) and the rest, rollouts
        and logging (``rest_ms``, ``rest_ratio``).
    """
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for task in dict.fromkeys(row["task"] for row in rows):
        by_pair: dict[int, dict[str, dict[str, float]]] = {}
        for row in rows:
            if row["task"] == task and not row["warmup"]:
                parts = {"": row["ms"], "train_": row["train_ms"], "rest_": row["ms"] - row["train_ms"]}
                by_pair.setdefault(row["pair"], {})[row["variant"]] = parts
        variants = list(dict.fromkeys(row["variant"] for row in rows if row["task"] == task))
        result[task] = {}
        for variant in variants:
            pairs = [pair for pair in by_pair.values() if variant in pair and BASELINE in pair]
            if not pairs:
                continue
            entry: dict[str, Any] = {"pairs": len(pairs)}
            for part in ("", "train_", "rest_"):
                ratios = [pair[variant][part] / pair[BASELINE][part] for pair in pairs]
                entry[f"{part}ms"] = statistics.median(pair[variant][part] for pair in pairs)
                entry[f"{part}ratio"] = (min(ratios), statistics.median(ratios), max(ratios))
            result[task][variant] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    """
    Command line entry point.

    :param argv: arguments (``sys.argv[1:]`` when ``None``).
    :return: the exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="measured env steps per run (default 8192, smoke 256)")
    parser.add_argument("--pairs", type=int, default=None, help="measured rounds per task (default 5, smoke 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets (needs --out)")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default: {DEFAULT_OUT})")
    parser.add_argument("--name", default=None, help="name of this run's folder (default: UTC time and git commit)")
    args = parser.parse_args(argv)
    if args.out is None and args.smoke:
        parser.error("--smoke writes to a separate results folder: pass --out")
    steps = args.steps if args.steps is not None else (256 if args.smoke else 8192)
    pairs = args.pairs if args.pairs is not None else (1 if args.smoke else 5)
    if steps < 1 or pairs < 1:
        parser.error(f"--steps and --pairs must be >= 1, got {steps} and {pairs}")
    th.set_num_threads(1)
    run_versions = versions()
    name = args.name or f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{run_versions['git_commit']}"
    rows = measure(steps, pairs)
    result = summary(rows)
    write_json(
        (args.out or DEFAULT_OUT) / name / "beyond.json",
        {
            "smoke": args.smoke,
            "created": timestamp(),
            "torch_threads": th.get_num_threads(),
            "load_average": os.getloadavg(),
            "versions": run_versions,
            "rows": rows,
            "summary": result,
        },
    )
    for task, variants in result.items():
        for variant, entry in variants.items():
            print(f"{task:50s} {variant:28s} {entry['ms']:.4f} ms, x{entry['ratio'][1]:.2f} vs {BASELINE} (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
