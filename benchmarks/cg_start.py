"""
Does the start of conjugate gradient change what TRPO learns? sb3-contrib starts it from ``1e-4 * randn`` (drawing
from torch's generator inside ``train()``), this package from zero. The update-map probe shows the two packages take
the same update from the same state, so this start, and the random numbers each package draws, are what remains
different between their runs.

Trains four variants on HalfCheetah-v5 with the zoo's settings (the packaged, translated ones for this package) for
``--steps`` steps, evaluating every 10,240 steps (3 deterministic episodes on a frozen ``VecNormalize`` copy, as the
returns benchmark evaluates):

- ``sb3_trpo_ext``: this package, conjugate gradient from zero;
- ``sb3_trpo_ext_random_start``: the same, conjugate gradient from ``1e-4 * randn`` as in sb3-contrib;
- ``sb3_contrib``: sb3-contrib's TRPO as it is;
- ``sb3_contrib_zero_start``: sb3-contrib's TRPO with its conjugate gradient started from zero.

Each run appends one JSON line to ``<out>/runs.jsonl``; finished runs are skipped, so the campaign resumes. Usage::

    python -m benchmarks.cg_start --seeds 100 101 102 --steps 61440
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import sync_envs_normalization

from benchmarks.common import MATCHED, RESULTS_DIR, make_eval_env, make_model, make_train_env, versions, zoo_config

DEFAULT_OUT = RESULTS_DIR / "diagnostics" / "cg_start"
VARIANTS = ("sb3_trpo_ext", "sb3_trpo_ext_random_start", "sb3_contrib", "sb3_contrib_zero_start")
ENV_ID = "HalfCheetah-v5"
EVAL_EVERY = 10_240  # five updates of the zoo's 2 x 1024 steps
RANDOM_START_SCALE = 1e-4  # sb3-contrib's conjugate_gradient_solver: x = 1e-4 * th.randn_like(b)


@contextmanager
def cg_start(variant: str) -> Iterator[None]:
    """Start each package's conjugate gradient as ``variant`` says while the block runs."""
    if variant == "sb3_trpo_ext_random_start":
        import sb3_trpo_ext.trpo.trpo as module

        solve = module.conjugate_gradient

        def random_start(matvec: Callable[[th.Tensor], th.Tensor], b: th.Tensor, *args: Any, **kwargs: Any) -> Any:
            # CG from x0 on A x = b is CG from zero on A y = b - A x0, then x = x0 + y
            x0 = RANDOM_START_SCALE * th.randn_like(b)
            result = solve(matvec, b - matvec(x0), *args, **kwargs)
            result.x.add_(x0)
            return result

        module.conjugate_gradient = random_start  # type: ignore[assignment]
        try:
            yield
        finally:
            module.conjugate_gradient = solve
    elif variant == "sb3_contrib_zero_start":
        import sb3_contrib.trpo.trpo as contrib_module

        solver = contrib_module.conjugate_gradient_solver

        def zero_start(*args: Any, **kwargs: Any) -> th.Tensor:
            randn_like = th.randn_like
            th.randn_like = lambda tensor, **_: th.zeros_like(tensor)  # type: ignore[assignment]
            try:
                return solver(*args, **kwargs)
            finally:
                th.randn_like = randn_like

        contrib_module.conjugate_gradient_solver = zero_start
        try:
            yield
        finally:
            contrib_module.conjugate_gradient_solver = solver
    else:
        yield


def run(variant: str, seed: int, steps: int) -> dict[str, Any]:
    """
    Train one variant, evaluating every :data:`EVAL_EVERY` steps.

    :return: the run's record: evaluations, mean return of the training episodes in the episode buffer, wall time.
    """
    th.set_num_threads(1)
    config = zoo_config(ENV_ID)
    env = make_train_env(config, seed=seed)
    model = make_model("sb3_contrib" if variant.startswith("sb3_contrib") else MATCHED, config, env, seed=seed)
    eval_env = make_eval_env(config, seed=seed)
    timesteps, evaluations = [], []
    start = time.perf_counter()
    with cg_start(variant):
        while model.num_timesteps < steps:
            model.learn(EVAL_EVERY, reset_num_timesteps=False)  # evaluation does not change training's random numbers
            sync_envs_normalization(env, eval_env)
            mean_return, _ = evaluate_policy(model, eval_env, n_eval_episodes=3)
            timesteps.append(model.num_timesteps)
            evaluations.append(float(mean_return))  # type: ignore[arg-type]
    return {
        "variant": variant,
        "env_id": ENV_ID,
        "seed": seed,
        "timesteps": timesteps,
        "evaluations": evaluations,
        "training_episodes_mean": float(np.mean([info["r"] for info in model.ep_info_buffer or []])),
        "wall_time_s": time.perf_counter() - start,
        "versions": versions(),
    }


def load_runs(path: Path) -> list[dict[str, Any]]:
    """
    :return: the runs recorded in ``path`` (none when it does not exist); a line that is not a whole record (a write
        cut short by an interruption) or a run without evaluations is left out, with a note on stderr, and is run
        again by a resumed campaign.
    """
    if not path.exists():
        return []
    runs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            run = json.loads(line)
            complete = isinstance(run, dict) and bool(run.get("timesteps")) and bool(run.get("evaluations"))
        except json.JSONDecodeError:
            complete = False
        if complete:
            runs.append(run)
        else:
            print(f"{path}:{number}: not a complete run, left out", file=sys.stderr)
    return runs


def main(argv: list[str] | None = None) -> int:
    """
    Command line entry point.

    :param argv: arguments (``sys.argv[1:]`` when ``None``).
    :return: the exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(100, 116)))
    parser.add_argument("--steps", type=int, default=61_440, help="training steps of each run (default: 30 updates)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.steps < EVAL_EVERY:
        parser.error(f"--steps must be >= {EVAL_EVERY} (one evaluation every {EVAL_EVERY} steps), got {args.steps}")
    path = args.out / "runs.jsonl"
    done = {(r["variant"], r["seed"], r["timesteps"][-1]) for r in load_runs(path)}
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # by seed, so that a partial campaign stays balanced between the variants
        for variant in args.variants:
            if any(key[:2] == (variant, seed) and key[2] >= args.steps for key in done):
                continue
            record = run(variant, seed, args.steps)
            ends_cleanly = not path.exists() or path.stat().st_size == 0 or path.read_bytes().endswith(b"\n")
            with path.open("a") as file:
                file.write(("" if ends_cleanly else "\n") + json.dumps(record) + "\n")  # after a cut-short line
            print(f"{variant} seed {seed}: evaluations {[round(e) for e in record['evaluations']]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
