"""
Returns benchmark: ``sb3_trpo_ext.TRPO`` and ``sb3_contrib.TRPO`` side by side, with the RL Zoo's TRPO settings.

One cell is (implementation, environment, seed); each finished cell writes
``<out>/<impl>/<env>/seed<k>.json`` holding its learning curve, final return, wall time and versions. Finished
cells are skipped, so an interrupted campaign resumes where it stopped. Evaluation is the zoo's: separate
deterministic episodes at fixed intervals through ``EvalCallback``, on an evaluation ``VecNormalize`` whose
statistics are copied from training before each evaluation and frozen (``training=False``, ``norm_reward=False``).

Usage::

    python -m benchmarks.returns                                  # the whole campaign, resumable
    python -m benchmarks.returns --envs HalfCheetah-v5 --seeds 0 1 --jobs 1
    python -m benchmarks.returns --smoke --out /tmp/smoke/returns  # tiny budgets, separate results
    python -m benchmarks.report --results /tmp/smoke --figures /tmp/smoke/figures --readme /tmp/smoke/README.md
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    IMPLS,
    RESULTS_DIR,
    RETURNS_IMPLS,
    make_eval_env,
    make_model,
    make_train_env,
    read_json,
    timestamp,
    versions,
    write_json,
    zoo_config,
)

#: Every environment of the campaign, in the order its cells run: the cheap ones first.
CLASSIC_ENVS = (
    "CartPole-v1",
    "Pendulum-v1",
    "Acrobot-v1",
    "MountainCarContinuous-v0",
    "LunarLander-v3",
    "LunarLanderContinuous-v3",
)
MUJOCO_1M_ENVS = ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5", "Swimmer-v5")
ENVS = (*CLASSIC_ENVS, *MUJOCO_1M_ENVS, "BipedalWalker-v3", "Humanoid-v5")
SEEDS = (0, 1, 2, 3, 4)
DEFAULT_OUT = RESULTS_DIR / "returns"


@dataclass(frozen=True)
class Cell:
    """
    One run of the campaign.

    :param impl: ``"sb3_trpo_ext"`` or ``"sb3_contrib"``.
    :param env_id: the Gymnasium environment id.
    :param seed: the seed of the model and of the environments.
    """

    impl: str
    env_id: str
    seed: int

    def path(self, out: Path) -> Path:
        """
        :param out: the results folder.
        :return: this cell's result file.
        """
        return out / self.impl / self.env_id / f"seed{self.seed}.json"

    def __str__(self) -> str:
        return f"{self.impl}/{self.env_id}/seed{self.seed}"


@dataclass(frozen=True)
class Budget:
    """
    Training and evaluation budget of one environment.

    :param n_timesteps: training steps.
    :param eval_interval: training steps between two evaluations.
    :param n_eval_episodes: deterministic episodes per evaluation.
    :param overrides: constructor arguments replacing the zoo's (only in smoke mode).
    """

    n_timesteps: int
    eval_interval: int
    n_eval_episodes: int
    overrides: dict[str, Any]


def budget(env_id: str, smoke: bool = False) -> Budget:
    """
    The zoo's training budget; an evaluation every 1% of it (every 10k steps at 1M) with 5 episodes for runs of 1M
    steps or more, and every 5% with 10 episodes for the short classic-control runs. Smoke mode: two rollouts of 64
    steps per environment, one evaluation episode after each.

    :param env_id: the Gymnasium environment id.
    :param smoke: tiny budgets for testing the pipeline.
    :return: the budget.
    """
    config = zoo_config(env_id)
    if smoke:
        n_steps = 64
        return Budget(
            n_timesteps=2 * n_steps * config.n_envs,
            eval_interval=n_steps * config.n_envs,
            n_eval_episodes=1,
            overrides={"n_steps": n_steps, "batch_size": 64, "n_critic_updates": 2},
        )
    if config.n_timesteps >= 1_000_000:
        return Budget(config.n_timesteps, config.n_timesteps // 100, 5, {})
    return Budget(config.n_timesteps, config.n_timesteps // 20, 10, {})


def run_cell(cell: Cell, out: Path, smoke: bool = False) -> dict[str, Any]:
    """
    Train one cell and write its result file.

    :param cell: the cell to run.
    :param out: the results folder.
    :param smoke: tiny budgets for testing the pipeline.
    :return: the result written.
    """
    import torch as th
    from stable_baselines3.common.callbacks import EvalCallback

    th.set_num_threads(1)
    config = zoo_config(cell.env_id)
    cell_budget = budget(cell.env_id, smoke)
    env = make_train_env(config, seed=cell.seed)
    eval_env = make_eval_env(config, seed=cell.seed)
    model = make_model(cell.impl, config, env, seed=cell.seed, **cell_budget.overrides)

    # Time the update step on this instance, to report the rollout/update split beside the returns.
    train_time = [0.0]
    train: Callable[[], None] = model.train

    def timed_train() -> None:
        start = time.perf_counter()
        train()
        train_time[0] += time.perf_counter() - start

    model.train = timed_train  # type: ignore[method-assign]

    with tempfile.TemporaryDirectory() as log_dir:
        evaluation = EvalCallback(
            eval_env,
            eval_freq=max(cell_budget.eval_interval // config.n_envs, 1),
            n_eval_episodes=cell_budget.n_eval_episodes,
            deterministic=True,
            log_path=log_dir,
            warn=False,
            verbose=0,
        )
        start = time.perf_counter()
        model.learn(cell_budget.n_timesteps, callback=evaluation)
        wall_time = time.perf_counter() - start
    env.close()
    eval_env.close()

    episode_returns = [[float(r) for r in results] for results in evaluation.evaluations_results]
    result = {
        "impl": cell.impl,
        "env_id": cell.env_id,
        "seed": cell.seed,
        "smoke": smoke,
        "n_timesteps": int(model.num_timesteps),
        "eval_interval": cell_budget.eval_interval,
        "n_eval_episodes": cell_budget.n_eval_episodes,
        "hyperparams": {**config.describe(), "overrides": cell_budget.overrides},
        # what the model was built with (differs from the zoo's numbers for the translated arm)
        "trust_region": {name: float(vars(model)[name]) for name in ("target_kl", "cg_damping")},
        "curve": {
            "timesteps": [int(t) for t in evaluation.evaluations_timesteps],
            "mean": [float(np.mean(r)) for r in episode_returns],
            "std": [float(np.std(r)) for r in episode_returns],
            "episode_returns": episode_returns,
        },
        "final_return": float(np.mean(episode_returns[-1])) if episode_returns else None,
        "wall_time_s": wall_time,
        "train_time_s": train_time[0],
        "finished_at": timestamp(),
        "versions": versions(),
    }
    write_json(cell.path(out), result)
    return result


def _run_cell_safely(cell: Cell, out: Path, smoke: bool) -> str | None:
    """
    :return: ``None`` on success, else the traceback (the campaign goes on with the other cells).
    """
    try:
        run_cell(cell, out, smoke)
    except Exception:
        return traceback.format_exc()
    return None


def all_cells(envs: tuple[str, ...], seeds: tuple[int, ...], impls: tuple[str, ...]) -> list[Cell]:
    """
    The cells in running order: by environment, then seed, then implementation, so that both implementations of a
    seed finish close together.

    :param envs: environment ids.
    :param seeds: seeds.
    :param impls: implementations.
    :return: the cells.
    """
    return [Cell(impl, env_id, seed) for env_id in envs for seed in seeds for impl in impls]


def is_finished(cell: Cell, out: Path, smoke: bool = False) -> bool:
    """
    :param cell: a cell.
    :param out: the results folder.
    :param smoke: whether the campaign is a smoke one (a smoke result does not finish a real cell, nor the reverse).
    :return: whether its result file exists and is complete.
    """
    result = read_json(cell.path(out))
    return result is not None and result.get("final_return") is not None and bool(result.get("smoke")) == smoke


def run_campaign(cells: list[Cell], out: Path, jobs: int, smoke: bool = False) -> list[Cell]:
    """
    Run the unfinished cells, ``jobs`` at a time, with a progress bar. Each cell of a real campaign gets a fresh
    process; smoke cells share their workers, whose start-up (importing torch) would dominate.

    :param cells: the cells to run (finished ones are skipped).
    :param out: the results folder.
    :param jobs: number of cells run in parallel.
    :param smoke: tiny budgets for testing the pipeline.
    :return: the cells that failed.
    """
    from tqdm import tqdm

    pending = [cell for cell in cells if not is_finished(cell, out, smoke)]
    print(f"{len(cells) - len(pending)} of {len(cells)} cells finished, {len(pending)} to run, {jobs} at a time")
    failed: list[Cell] = []
    queue: Iterator[Cell] = iter(pending)
    running: dict[Future[str | None], Cell] = {}
    context = multiprocessing.get_context("spawn")
    with (
        ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=None if smoke else 1) as pool,
        tqdm(total=len(pending), unit="cell", dynamic_ncols=True) as bar,
    ):

        def fill() -> None:
            while len(running) < jobs:
                cell = next(queue, None)
                if cell is None:
                    return
                running[pool.submit(_run_cell_safely, cell, out, smoke)] = cell

        fill()
        while running:
            bar.set_postfix_str("running: " + ", ".join(str(cell) for cell in running.values()))
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                cell = running.pop(future)
                error = future.exception() or future.result()
                if error is not None:
                    failed.append(cell)
                    tqdm.write(f"FAILED {cell}:\n{error}")
                else:
                    tqdm.write(f"{timestamp()} finished {cell}")
                bar.update(1)
            fill()
    return failed


def main(argv: list[str] | None = None) -> int:
    """
    Command line entry point.

    :param argv: arguments (``sys.argv[1:]`` when ``None``).
    :return: the exit status: 1 when a cell failed.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(ENVS), help="environment ids (default: all, in order)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="seeds (default: 0 1 2 3 4)")
    parser.add_argument(
        "--impls",
        nargs="+",
        default=list(IMPLS),
        choices=RETURNS_IMPLS,
        help="implementations (default: the two packages; sb3_trpo_ext_contrib_kl: sb3_trpo_ext with sb3-contrib's "
        "trust region, see sb3_trpo_ext.from_sb3_contrib)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="cells run in parallel (default: cores)")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets (needs --out)")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default: {DEFAULT_OUT})")
    parser.add_argument("--list", action="store_true", help="list the cells and whether they are finished, then exit")
    args = parser.parse_args(argv)

    out = args.out
    if out is None:
        if args.smoke:
            parser.error("--smoke writes to a separate results folder: pass --out")
        out = DEFAULT_OUT
    cells = all_cells(tuple(args.envs), tuple(args.seeds), tuple(args.impls))
    if args.list:
        for cell in cells:
            print(f"{'done' if is_finished(cell, out, args.smoke) else 'todo'}  {cell}")
        return 0
    failed = run_campaign(cells, out, max(args.jobs, 1), args.smoke)
    for cell in failed:
        print(f"failed: {cell}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
