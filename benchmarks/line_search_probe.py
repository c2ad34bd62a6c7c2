"""
Does the direction of the line search's KL matter in practice? sb3_trpo_ext checks the paper's ``KL(old || new)``,
sb3-contrib checks ``KL(new || old)``; both have the same quadratic model, so the two line searches can only take
different steps where the first candidate's KL lies near the bound.

This trains ``sb3_trpo_ext.TRPO`` with the settings ``--algo trpo_ext`` ships (the zoo's, translated to
sb3-contrib's trust region by ``from_sb3_contrib``) and records, for every update: the backtracks of the line search,
whether it accepted a step, the first candidate's KL in both directions (means over the batch) and its surrogate gain,
and the policy's mean standard deviation. The summary counts the updates where the two directions would decide
differently on the first candidate.

Writes ``<out>/<env>-seed<k>.json``. Usage::

    python -m benchmarks.line_search_probe --env HalfCheetah-v5 --seed 1 --steps 1000000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch as th

from benchmarks.common import (
    MATCHED,
    RESULTS_DIR,
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
from sb3_trpo_ext.common.numerics import DistParams, assign_flat_parameters, flat_parameters, kl_old_new
from sb3_trpo_ext.trpo.trpo import PolicyStepStats

DEFAULT_OUT = RESULTS_DIR / "diagnostics" / "line_search"


class ProbedTRPO(TRPO):
    """``TRPO`` that records, after each line search, what both KL directions say about its first candidate."""

    records: list[dict[str, Any]]

    def _line_search(  # type: ignore[override]
        self,
        params: list[th.nn.Parameter],
        full_step: th.Tensor,
        observations: Any,
        actions: th.Tensor,
        old_log_prob: th.Tensor,
        advantages: th.Tensor,
        old: DistParams,
        surrogate_before: float,
        stats: PolicyStepStats,
    ) -> None:
        theta_old = flat_parameters(params)
        super()._line_search(params, full_step, observations, actions, old_log_prob, advantages, old, surrogate_before, stats)
        accepted = flat_parameters(params)
        with th.no_grad():
            assign_flat_parameters(params, theta_old + full_step)  # the first candidate
            surrogate, new = self._surrogate(observations, actions, old_log_prob, advantages)
            kl_paper, kl_reverse = kl_old_new(old, new).mean().item(), kl_old_new(new, old).mean().item()
            assign_flat_parameters(params, accepted)  # what the line search chose, bit for bit
        self.records.append(
            {
                "timesteps": self.num_timesteps,
                "backtracks": stats.backtracks,
                "accepted": stats.accepted,
                "first_kl_old_new": kl_paper,
                "first_kl_new_old": kl_reverse,
                "first_surrogate_gain": surrogate.item() - surrogate_before,
                "std": old.tensors[1].exp().mean().item() if old.kind == "gaussian" else None,  # before the update
            }
        )


def summary(records: list[dict[str, Any]], target_kl: float) -> dict[str, Any]:
    """
    :param records: the per-update records of :class:`ProbedTRPO`.
    :param target_kl: the bound of the line search.
    :return: counts and medians; ``decisions_differ`` counts the updates where the first candidate passes the
        acceptance rule in one KL direction and not in the other.
    """

    def passes(record: dict[str, Any], key: str) -> bool:
        return record[key] <= target_kl and record["first_surrogate_gain"] > 0

    return {
        "updates": len(records),
        "updates_with_backtracks": sum(r["backtracks"] > 0 for r in records),
        "updates_rejected": sum(not r["accepted"] for r in records),
        "decisions_differ": sum(passes(r, "first_kl_old_new") != passes(r, "first_kl_new_old") for r in records),
        "median_first_kl_old_new": statistics.median(r["first_kl_old_new"] for r in records),
        "median_first_kl_new_old": statistics.median(r["first_kl_new_old"] for r in records),
        "max_first_kl_old_new": max(r["first_kl_old_new"] for r in records),
        "max_first_kl_new_old": max(r["first_kl_new_old"] for r in records),
        "target_kl": target_kl,
    }


def main(argv: list[str] | None = None) -> int:
    """
    Command line entry point.

    :param argv: arguments (``sys.argv[1:]`` when ``None``).
    :return: the exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    probe_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    config = zoo_config(args.env)
    steps = probe_steps(parser, args.steps, config)
    th.set_num_threads(1)
    model = make_model(MATCHED, config, make_train_env(config, seed=args.seed), args.seed, algorithm=ProbedTRPO)
    assert isinstance(model, ProbedTRPO)
    model.records = []
    start = time.perf_counter()
    model.learn(steps)
    result = {
        "created": timestamp(),
        "env_id": args.env,
        "seed": args.seed,
        "timesteps": model.num_timesteps,
        "target_kl": model.target_kl,
        "cg_damping": model.cg_damping,
        "wall_time_s": time.perf_counter() - start,
        "versions": versions(),
        "summary": summary(model.records, model.target_kl),
        "records": model.records,
    }
    write_json(args.out / f"{args.env}-seed{args.seed}.json", result)
    print(result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
