"""
Would sb3-contrib's TRPO have taken the same update, at every stage of a real training run?

The equivalence tests compare one update, or a few updates on small tasks. On HalfCheetah-v5 a whole-run comparison
cannot go further than one update: MuJoCo amplifies the float32 rounding between the two packages (about 1e-8 in the
parameters) until the rollouts part, within a few dozen steps of the second rollout. So this probe compares update
maps instead of runs. It trains ``sb3_trpo_ext.TRPO`` with the settings ``--algo trpo_ext`` ships (the zoo's,
translated by ``from_sb3_contrib``), and before every ``--every``-th update it hands the exact state (policy and
critic weights, Adam's state, the rollout buffer, the learning-rate progress) to an ``sb3_contrib.TRPO`` built with the
zoo's numbers and lets both run ``train()``, then puts everything back before the run's own update: the run is the
one it would be without the probe (tested), the training run of the returns benchmark's cell with the same seed.

Within the comparison the random numbers drawn inside ``train()`` are the same for both: sb3-contrib's conjugate
gradient starts from zero instead of ``1e-4 * randn``, and this package's critic minibatches follow sb3-contrib's
``RolloutBuffer.get`` permutations. Each record holds the relative difference of the two actor steps and of the two
critic changes, their length ratio, and both packages' line-search outcomes. For scale, each record also holds how
far sb3-contrib's own update moves when its conjugate gradient starts from ``1e-4 * randn``, as it does in its runs,
instead of zero.

Writes ``<out>/<env>-seed<k>.json``. Usage::

    python -m benchmarks.update_map_probe --env HalfCheetah-v5 --seed 1 --every 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import configure
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.vec_env import sync_envs_normalization

from benchmarks.common import (
    MATCHED,
    RESULTS_DIR,
    make_eval_env,
    make_model,
    make_train_env,
    probe_arguments,
    probe_steps,
    timestamp,
    versions,
    write_json,
    zoo_config,
)
from sb3_trpo_ext import TRPO
from sb3_trpo_ext.common.policy_utils import process_wide

DEFAULT_OUT = RESULTS_DIR / "diagnostics" / "update_map"
ACTOR_PREFIXES = ("action_net", "log_std", "mlp_extractor.policy_net")
CRITIC_PREFIXES = ("value_net", "mlp_extractor.value_net")


def change(after: dict[str, th.Tensor], before: dict[str, th.Tensor], prefixes: tuple[str, ...]) -> th.Tensor:
    """The flattened change of the parameters whose names start with one of ``prefixes``."""
    return th.cat([(after[key] - before[key]).flatten() for key in before if key.startswith(prefixes)])


def compare(mine: th.Tensor, reference: th.Tensor) -> tuple[float, float]:
    """:return: ``|mine - reference| / |reference|`` and ``|mine| / |reference|``."""
    norm = reference.norm().item()
    if norm == 0.0:
        return (0.0 if mine.norm().item() == 0.0 else float("inf")), float("nan")
    return (mine - reference).norm().item() / norm, mine.norm().item() / norm


class MirroredTRPO(TRPO):
    """``TRPO`` that, before every ``every``-th update, compares its update with sb3-contrib's from the same state."""

    reference: OnPolicyAlgorithm
    every: int
    records: list[dict[str, Any]]

    def mirror(self, reference: OnPolicyAlgorithm, every: int) -> MirroredTRPO:
        """
        :param reference: an ``sb3_contrib.TRPO`` with the same policy architecture (its environment only gives the
            spaces; it never steps).
        :param every: compare every ``every``-th update (the first included).
        :return: this model.
        """
        reference.set_logger(configure(None, [""]))
        self.reference, self.every, self.records = reference, every, []
        return self

    def train(self) -> None:
        if self._n_updates % self.every == 0:
            self.records.append(self._compare_update())
        super().train()

    def _snapshot(self) -> dict[str, Any]:
        return {
            "policy": {key: value.clone() for key, value in self.policy.state_dict().items()},
            "optimizer": copy.deepcopy(self.policy.optimizer.state_dict()),
            "buffer": copy.deepcopy(self.rollout_buffer),
            "torch_rng": th.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "n_updates": self._n_updates,
        }

    def _restore(self, model: OnPolicyAlgorithm, snapshot: dict[str, Any]) -> None:
        model.policy.load_state_dict(snapshot["policy"])
        model.policy.optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
        model.rollout_buffer = copy.deepcopy(snapshot["buffer"])
        th.set_rng_state(snapshot["torch_rng"])
        np.random.set_state(snapshot["numpy_rng"])

    def _contrib_permutations(self, n_samples: int) -> list[np.ndarray]:
        """
        The critic's minibatch orders sb3-contrib will draw, as positions in the batch this package trains on: both
        take the whole batch from ``RolloutBuffer.get`` (one permutation ``p0``); sb3-contrib then calls ``get``
        again for every critic epoch (``p1``, ``p2``, ...) on the unshuffled buffer.
        """
        state = np.random.get_state()
        p0 = np.random.permutation(n_samples)
        epochs = [np.random.permutation(n_samples) for _ in range(self.n_critic_updates)]
        np.random.set_state(state)
        position = np.argsort(p0)  # where each buffer row sits in this package's batch
        return [position[p] for p in epochs]

    def _compare_update(self) -> dict[str, Any]:
        snapshot = self._snapshot()
        n_samples = self.rollout_buffer.buffer_size * self.rollout_buffer.n_envs
        orders = self._contrib_permutations(n_samples)
        calls: list[int] = []

        def randperm(n: int, **kwargs: Any) -> th.Tensor:
            assert n == n_samples, (n, n_samples)
            calls.append(n)
            return th.from_numpy(orders[len(calls) - 1]).to(kwargs.get("device") or "cpu")

        with process_wide(th, "randperm", randperm):  # th.randperm replaced for the block
            super().train()
        if len(calls) != self.n_critic_updates:
            raise RuntimeError(f"expected {self.n_critic_updates} critic permutations, drew {len(calls)}")
        mine = {key: value.clone() for key, value in self.policy.state_dict().items()}
        logged_mine = dict(self.logger.name_to_value)

        reference = self.reference
        self._restore(reference, snapshot)
        reference._current_progress_remaining = self._current_progress_remaining
        reference.num_timesteps = self.num_timesteps
        with process_wide(th, "randn_like", lambda tensor, **_: th.zeros_like(tensor)):
            reference.train()
        theirs = {key: value.clone() for key, value in reference.policy.state_dict().items()}
        logged_theirs = dict(reference.logger.name_to_value)
        # sb3-contrib as it runs: conjugate gradient from 1e-4 * randn (the run's own random numbers). How far this
        # moves its update is the spread sb3-contrib itself has between two updates from the same state.
        self._restore(reference, snapshot)
        reference.train()
        noisy = {key: value.clone() for key, value in reference.policy.state_dict().items()}

        self._restore(self, snapshot)
        self._n_updates = snapshot["n_updates"]

        before = snapshot["policy"]
        actor_difference, actor_length_ratio = compare(
            change(mine, before, ACTOR_PREFIXES), change(theirs, before, ACTOR_PREFIXES)
        )
        critic_difference, critic_length_ratio = compare(
            change(mine, before, CRITIC_PREFIXES), change(theirs, before, CRITIC_PREFIXES)
        )
        own_spread, _ = compare(change(noisy, before, ACTOR_PREFIXES), change(theirs, before, ACTOR_PREFIXES))
        return {
            "timesteps": self.num_timesteps,
            "actor_difference": actor_difference,
            "contrib_cg_start_difference": own_spread,
            "actor_length_ratio": actor_length_ratio,
            "critic_difference": critic_difference,
            "critic_length_ratio": critic_length_ratio,
            "accepted": bool(logged_mine.get("train/line_search_success", 0.0)),
            "backtracks": int(logged_mine.get("train/line_search_backtracks", 0)),
            # sb3-contrib logs 1 for an accepted step under this key, whatever its name says
            "contrib_accepted": bool(logged_theirs.get("train/is_line_search_success", 0.0)),
            "kl_divergence_loss": logged_mine.get("train/kl_divergence_loss"),
            "contrib_kl_divergence_loss": logged_theirs.get("train/kl_divergence_loss"),
            "value_loss": logged_mine.get("train/value_loss"),
            "contrib_value_loss": logged_theirs.get("train/value_loss"),
        }


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """
    :param records: the per-update records of :class:`MirroredTRPO`.
    :return: medians and maxima of the differences, and the updates where the line searches decided differently.
    """
    return {
        "updates_compared": len(records),
        "median_actor_difference": statistics.median(r["actor_difference"] for r in records),
        "max_actor_difference": max(r["actor_difference"] for r in records),
        "median_contrib_cg_start_difference": statistics.median(r["contrib_cg_start_difference"] for r in records),
        "max_contrib_cg_start_difference": max(r["contrib_cg_start_difference"] for r in records),
        "median_critic_difference": statistics.median(r["critic_difference"] for r in records),
        "max_critic_difference": max(r["critic_difference"] for r in records),
        "min_actor_length_ratio": min(r["actor_length_ratio"] for r in records),
        "max_actor_length_ratio": max(r["actor_length_ratio"] for r in records),
        "acceptance_differs": sum(r["accepted"] != r["contrib_accepted"] for r in records),
        "updates_with_backtracks": sum(r["backtracks"] > 0 for r in records),
    }


def build(env_id: str, seed: int, every: int) -> MirroredTRPO:
    """
    :return: this package's TRPO with the translated zoo settings, mirrored by sb3-contrib's TRPO with the zoo's.
    """
    config = zoo_config(env_id)
    model = make_model(MATCHED, config, make_train_env(config, seed=seed), seed, algorithm=MirroredTRPO)
    assert isinstance(model, MirroredTRPO)
    state = th.get_rng_state(), np.random.get_state()  # the run must not feel the reference's construction
    reference = make_model("sb3_contrib", config, make_train_env(config, seed=seed), seed)
    th.set_rng_state(state[0])
    np.random.set_state(state[1])
    return model.mirror(reference, every)


def main(argv: list[str] | None = None) -> int:
    """
    Command line entry point.

    :param argv: arguments (``sys.argv[1:]`` when ``None``).
    :return: the exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    probe_arguments(parser, DEFAULT_OUT)
    parser.add_argument("--every", type=int, default=10, help="compare every k-th update (default: 10)")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error(f"--every must be >= 1, got {args.every}")
    config = zoo_config(args.env)
    steps = probe_steps(parser, args.steps, config)  # the first update is compared
    th.set_num_threads(1)
    model = build(args.env, args.seed, args.every)
    start = time.perf_counter()
    model.learn(steps)
    wall_time = time.perf_counter() - start
    # Which way the run went (HalfCheetah's returns are bimodal): deterministic episodes, as the returns benchmark
    eval_env = make_eval_env(config, seed=args.seed)
    sync_envs_normalization(model.env, eval_env)  # type: ignore[arg-type]
    mean_return, _ = evaluate_policy(model, eval_env, n_eval_episodes=5)
    result = {
        "created": timestamp(),
        "env_id": args.env,
        "seed": args.seed,
        "timesteps": model.num_timesteps,
        "every": args.every,
        "wall_time_s": wall_time,
        "final_return": float(mean_return),  # type: ignore[arg-type]
        "versions": versions(),
        "summary": summary(model.records),
        "records": model.records,
    }
    write_json(args.out / f"{args.env}-seed{args.seed}.json", result)
    print(result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
