"""
Speed benchmark: ``sb3_trpo_ext.TRPO`` against ``sb3_contrib.TRPO`` on the same machine, in the same run, CPU,
torch on one thread.

Sections (each writes ``<out>/<run>/<section>.json`` with every raw measurement):

- ``learn``: end-to-end ``learn()`` wall time and update-step (``train()``) time, runs alternated A/B/A/B after a
  warm-up pair, on CartPole-v1 and Pendulum-v1 (the zoo's settings) and HalfCheetah-v5, Hopper-v5, Humanoid-v5
  (the zoo's MuJoCo settings). ``train()`` is timed by wrapping the method on the instance.
- ``floor``: the bare ``VecEnv.step`` time per environment step of HalfCheetah-v5 (``DummyVecEnv`` of 2, random
  actions); the report divides the end-to-end time per environment step by it (the "floor ratio").
- ``batch`` and ``width``: update-step time against the samples per update (1k to 64k) and against the width of
  both hidden layers of actor and critic (64 to 512 units), HalfCheetah-v5 settings otherwise.
- ``n_envs``: end-to-end time per environment step against the number of environments (1, 2, 8, 16),
  ``DummyVecEnv`` and ``SubprocVecEnv``, with the samples per update kept at 8192.

Usage::

    python -m benchmarks.speed                     # everything, about 15 minutes on a 2-core machine
    python -m benchmarks.speed --sections learn --envs HalfCheetah-v5
    python -m benchmarks.speed --smoke --out /tmp/speed-smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecEnvWrapper

from benchmarks.common import (
    IMPLS,
    RESULTS_DIR,
    ZooConfig,
    make_model,
    make_train_env,
    timestamp,
    versions,
    write_json,
    zoo_config,
)

SECTIONS = ("learn", "floor", "batch", "width", "n_envs")
LEARN_ENVS = ("CartPole-v1", "Pendulum-v1", "HalfCheetah-v5", "Hopper-v5", "Humanoid-v5")
#: Environment of the floor ratio and of the cost-growth sweeps.
SWEEP_ENV = "HalfCheetah-v5"
DEFAULT_OUT = RESULTS_DIR / "speed"


@dataclass(frozen=True)
class Settings:
    """
    Budgets of one speed run.

    :param learn_timesteps: steps of each ``learn()`` measurement, per environment.
    :param pairs: measured A/B pairs per environment (after one warm-up pair).
    :param floor_steps: ``VecEnv.step`` calls per floor measurement.
    :param floor_repeats: floor measurements.
    :param batch_sizes: samples per update of the batch sweep.
    :param widths: hidden-layer widths of the width sweep.
    :param sweep_repeats: ``train()`` calls per implementation and sweep point.
    :param n_envs: numbers of environments of the ``n_envs`` sweep.
    :param n_envs_samples: samples per update in the ``n_envs`` sweep (``n_steps = n_envs_samples // n_envs``).
    :param n_envs_rollouts: rollouts per ``n_envs`` measurement.
    :param overrides: constructor arguments replacing the zoo's (only in smoke mode).
    """

    learn_timesteps: dict[str, int]
    pairs: int = 5
    floor_steps: int = 5000
    floor_repeats: int = 5
    batch_sizes: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    sweep_repeats: int = 3
    n_envs: tuple[int, ...] = (1, 2, 8, 16)
    n_envs_samples: int = 8192
    n_envs_rollouts: int = 2
    overrides: tuple[tuple[str, Any], ...] = ()


DEFAULT_SETTINGS = Settings(
    learn_timesteps={
        "CartPole-v1": 16_384,
        "Pendulum-v1": 16_384,
        "HalfCheetah-v5": 12_288,
        "Hopper-v5": 12_288,
        "Humanoid-v5": 8_192,
    }
)
SMOKE_SETTINGS = Settings(
    learn_timesteps=dict.fromkeys(LEARN_ENVS, 256),
    pairs=2,
    floor_steps=200,
    floor_repeats=2,
    batch_sizes=(256, 512),
    widths=(16, 32),
    sweep_repeats=2,
    n_envs=(1, 2),
    n_envs_samples=256,
    n_envs_rollouts=1,
    overrides=(("n_steps", 64), ("batch_size", 64), ("n_critic_updates", 2)),
)


class TrainTimer:
    """
    Wraps ``model.train`` on one instance and records the duration of each call.

    :param model: the model whose update step is timed.
    """

    def __init__(self, model: BaseAlgorithm) -> None:
        self.times: list[float] = []
        self._train: Callable[[], None] = model.train  # type: ignore[attr-defined]
        model.train = self  # type: ignore[attr-defined]

    def __call__(self) -> None:
        start = time.perf_counter()
        self._train()
        self.times.append(time.perf_counter() - start)


class StepTimer:
    """
    Wraps ``step`` of each environment inside the training ``VecEnv`` (the ``Monitor`` on top of the Gymnasium
    environment, where the zoo puts it) and adds up the time spent in them: the simulation itself, the part of a
    rollout that no algorithm can change. The vectorised wrappers around them (``DummyVecEnv``, ``VecNormalize``) are
    not in it: they count as the algorithm's own time, since an implementation may step them more cheaply.

    :param env: the model's training environment (a ``DummyVecEnv``, possibly under ``VecEnvWrapper``s).
    """

    def __init__(self, env: VecEnv) -> None:
        self.total = 0.0
        base = env
        while isinstance(base, VecEnvWrapper):
            base = base.venv
        assert isinstance(base, DummyVecEnv), "the environments are timed in the process that steps them"
        for inner in base.envs:
            inner.step = self._timed(inner.step)  # type: ignore[method-assign]

    def _timed(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def timed_step(action: Any) -> Any:
            start = time.perf_counter()
            result = step(action)
            self.total += time.perf_counter() - start
            return result

        return timed_step


def build(
    impl: str,
    config: ZooConfig,
    seed: int,
    settings: Settings,
    n_envs: int | None = None,
    vec_env_cls: type[VecEnv] = DummyVecEnv,
    **overrides: Any,
) -> tuple[BaseAlgorithm, TrainTimer]:
    """
    A model with the zoo's settings and a timer on its update step (construction is never timed).

    :param impl: the implementation.
    :param config: the environment's settings.
    :param seed: the seed.
    :param settings: the run's budgets (smoke overrides).
    :param n_envs: number of environments, the zoo's when ``None``.
    :param vec_env_cls: ``DummyVecEnv`` or ``SubprocVecEnv``.
    :param overrides: constructor arguments replacing the zoo's (applied after the smoke ones).
    :return: the model and its timer.
    """
    env = make_train_env(config, seed=seed, n_envs=n_envs, vec_env_cls=vec_env_cls)
    model = make_model(impl, config, env, seed=seed, **{**dict(settings.overrides), **overrides})
    return model, TrainTimer(model)


def timed_learn(model: BaseAlgorithm, timesteps: int) -> float:
    """
    :param model: the model.
    :param timesteps: the training budget.
    :return: the wall time of ``model.learn(timesteps)``, in seconds.
    """
    start = time.perf_counter()
    model.learn(timesteps)
    elapsed = time.perf_counter() - start
    model.get_env().close()  # type: ignore[union-attr]
    return elapsed


def measure_learn(envs: tuple[str, ...], settings: Settings) -> list[dict[str, Any]]:
    """
    End-to-end and update-step time, one warm-up pair then ``settings.pairs`` measured pairs per environment, the
    implementations alternated A/B/A/B; both runs of a pair use the same seed.

    :param envs: environment ids.
    :param settings: the run's budgets.
    :return: one row per ``learn()`` call.
    """
    rows = []
    for env_id in envs:
        config = zoo_config(env_id)
        timesteps = settings.learn_timesteps[env_id]
        for pair in range(-1, settings.pairs):
            for impl in IMPLS:
                model, timer = build(impl, config, seed=max(pair, 0), settings=settings)
                step_timer = StepTimer(model.get_env())  # type: ignore[arg-type]
                learn_s = timed_learn(model, timesteps)
                rows.append(
                    {
                        "env_id": env_id,
                        "impl": impl,
                        "pair": pair,
                        "warmup": pair < 0,
                        "timesteps": int(model.num_timesteps),
                        "learn_s": learn_s,
                        "train_s": sum(timer.times),
                        "envs_step_s": step_timer.total,
                        "n_updates": len(timer.times),
                    }
                )
                print(f"learn {env_id:16s} {impl:13s} pair {pair:2d}: {learn_s:7.2f} s, train {sum(timer.times):6.2f} s")
    return rows


def measure_floor(settings: Settings, n_envs: int = 2) -> list[dict[str, Any]]:
    """
    Bare ``VecEnv.step`` time of HalfCheetah-v5: ``make_vec_env`` (a ``Monitor`` on each environment, as in
    training), ``DummyVecEnv`` of ``n_envs``, random actions drawn in advance.

    :param settings: the run's budgets.
    :param n_envs: number of environments.
    :return: one row per measurement.
    """
    rows = []
    env = make_vec_env(SWEEP_ENV, n_envs=n_envs, seed=0)
    rng = np.random.default_rng(0)
    low, high = env.action_space.low, env.action_space.high  # type: ignore[attr-defined]
    for repeat in range(settings.floor_repeats + 1):
        actions = rng.uniform(low, high, size=(settings.floor_steps, n_envs, *low.shape)).astype(np.float32)
        env.reset()
        start = time.perf_counter()
        for action in actions:
            env.step(action)
        elapsed = time.perf_counter() - start
        if repeat > 0:  # the first pass is a warm-up
            rows.append({"env_id": SWEEP_ENV, "n_envs": n_envs, "steps": settings.floor_steps, "step_s": elapsed})
            print(f"floor {SWEEP_ENV}: {1e6 * elapsed / (settings.floor_steps * n_envs):.1f} us per env step")
    env.close()
    return rows


def measure_update_sweep(
    name: str, points: tuple[int, ...], overrides_of: Callable[[int], dict[str, Any]], settings: Settings
) -> list[dict[str, Any]]:
    """
    Update-step time at each sweep point: one real rollout per implementation (``learn`` for one update), then
    ``settings.sweep_repeats - 1`` more ``train()`` calls on the same buffer, alternating the implementations.

    :param name: the swept quantity (``"batch_size"`` or ``"width"``).
    :param points: its values.
    :param overrides_of: the constructor arguments of one value.
    :param settings: the run's budgets.
    :return: one row per implementation and value, with every ``train()`` time.
    """
    config = zoo_config(SWEEP_ENV)
    rows = []
    for point in points:
        overrides = overrides_of(point)
        models = {}
        for impl in IMPLS:
            model, timer = build(impl, config, seed=0, settings=settings, **overrides)
            model.learn(model.n_steps * model.n_envs)  # type: ignore[attr-defined]
            models[impl] = (model, timer)
        for _ in range(settings.sweep_repeats - 1):
            for model, _timer in models.values():
                model.train()  # type: ignore[attr-defined]
        for impl, (model, timer) in models.items():
            model.get_env().close()  # type: ignore[union-attr]
            rows.append({"impl": impl, name: point, "train_s": timer.times})
            print(f"{name} {point:6d} {impl:13s}: train median {statistics.median(timer.times):.3f} s")
    return rows


def measure_n_envs(settings: Settings) -> list[dict[str, Any]]:
    """
    End-to-end time per environment step against the number of environments, alternating the implementations.

    :param settings: the run's budgets.
    :return: one row per ``learn()`` call.
    """
    config = zoo_config(SWEEP_ENV)
    rows = []
    for vec_env_cls in (DummyVecEnv, SubprocVecEnv):
        for n_envs in settings.n_envs:
            n_steps = max(settings.n_envs_samples // n_envs, 2)
            for impl in IMPLS:
                model, timer = build(
                    impl, config, seed=0, settings=settings, n_envs=n_envs, vec_env_cls=vec_env_cls, n_steps=n_steps
                )
                learn_s = timed_learn(model, settings.n_envs_rollouts * n_steps * n_envs)
                rows.append(
                    {
                        "impl": impl,
                        "vec_env": vec_env_cls.__name__,
                        "n_envs": n_envs,
                        "timesteps": int(model.num_timesteps),
                        "learn_s": learn_s,
                        "train_s": sum(timer.times),
                    }
                )
                us = 1e6 * learn_s / model.num_timesteps
                print(f"n_envs {vec_env_cls.__name__:12s} {n_envs:3d} {impl:13s}: {us:7.1f} us per env step")
    return rows


#: What the environment time of a ``learn`` row measures, by its key.
ENV_TIME_KEYS = {"envs_step_s": "environments", "env_step_s": "vec_env"}


def learn_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """
    Speed-ups of the measured pairs (``sb3_contrib`` time divided by ``sb3_trpo_ext`` time: above 1 means
    ``sb3_trpo_ext`` is faster), and median times per implementation.

    :param rows: rows of the ``learn`` section.
    :return: per environment: ``learn_ratio`` and ``train_ratio`` as ``(min, median, max)``, ``pairs``, and per
        implementation the median ``us_per_step`` and ``train_s_per_update``, and where the time of an environment
        step goes (medians, µs): ``env_us`` (in the environments' own ``step``, or in the training ``VecEnv.step`` for
        runs that timed that: ``env_timed``), ``train_us`` (in ``train()``) and ``other_us`` (the rest: the
        vectorised wrappers where not in ``env_us``, the policy's forward pass, the buffer, callbacks, GAE), when
        recorded.
    """
    summary: dict[str, dict[str, Any]] = {}
    for env_id in dict.fromkeys(row["env_id"] for row in rows):
        by_pair: dict[int, dict[str, dict[str, Any]]] = {}
        for row in rows:
            if row["env_id"] == env_id and not row["warmup"]:
                by_pair.setdefault(row["pair"], {})[row["impl"]] = row
        pairs = [pair for pair in by_pair.values() if set(IMPLS) <= set(pair)]
        if not pairs:
            continue
        learn = [pair["sb3_contrib"]["learn_s"] / pair["sb3_trpo_ext"]["learn_s"] for pair in pairs]
        train = [pair["sb3_contrib"]["train_s"] / pair["sb3_trpo_ext"]["train_s"] for pair in pairs]
        entry: dict[str, Any] = {
            "pairs": len(pairs),
            "learn_ratio": (min(learn), statistics.median(learn), max(learn)),
            "train_ratio": (min(train), statistics.median(train), max(train)),
        }
        for impl in IMPLS:
            entry[impl] = {
                "us_per_step": statistics.median(1e6 * pair[impl]["learn_s"] / pair[impl]["timesteps"] for pair in pairs),
                "train_s_per_update": statistics.median(
                    pair[impl]["train_s"] / max(pair[impl]["n_updates"], 1) for pair in pairs
                ),
            }
            # runs from before 2026-11-27 timed the whole training VecEnv.step ("env_step_s"), later ones the
            # environments inside it ("envs_step_s")
            env_key = next((key for key in ENV_TIME_KEYS if all(key in pair[impl] for pair in pairs)), None)
            if env_key is not None:
                entry["env_timed"] = ENV_TIME_KEYS[env_key]
                per_step = [
                    {
                        "env_us": 1e6 * pair[impl][env_key] / pair[impl]["timesteps"],
                        "train_us": 1e6 * pair[impl]["train_s"] / pair[impl]["timesteps"],
                        "other_us": 1e6
                        * (pair[impl]["learn_s"] - pair[impl][env_key] - pair[impl]["train_s"])
                        / pair[impl]["timesteps"],
                    }
                    for pair in pairs
                ]
                entry[impl].update({key: statistics.median(part[key] for part in per_step) for key in per_step[0]})
        summary[env_id] = entry
    return summary


def floor_summary(learn_rows: list[dict[str, Any]], floor_rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """
    The floor ratio of HalfCheetah-v5: median end-to-end time per environment step (measured pairs) divided by the
    median bare ``VecEnv.step`` time per environment step.

    :param learn_rows: rows of the ``learn`` section.
    :param floor_rows: rows of the ``floor`` section.
    :return: ``bare_us_per_step`` and per implementation ``us_per_step`` and ``floor_ratio``; ``None`` when either
        section lacks HalfCheetah-v5.
    """
    bare = [1e6 * row["step_s"] / (row["steps"] * row["n_envs"]) for row in floor_rows if row["env_id"] == SWEEP_ENV]
    learn = learn_summary([row for row in learn_rows if row["env_id"] == SWEEP_ENV]).get(SWEEP_ENV)
    if not bare or learn is None:
        return None
    bare_us = statistics.median(bare)
    result: dict[str, Any] = {"env_id": SWEEP_ENV, "bare_us_per_step": bare_us}
    for impl in IMPLS:
        result[impl] = {"us_per_step": learn[impl]["us_per_step"], "floor_ratio": learn[impl]["us_per_step"] / bare_us}
    return result


def main(argv: list[str] | None = None) -> int:
    """
    Command line entry point.

    :param argv: arguments (``sys.argv[1:]`` when ``None``).
    :return: the exit status.
    """
    import torch as th

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="what to measure")
    parser.add_argument("--envs", nargs="+", default=list(LEARN_ENVS), choices=LEARN_ENVS, help="envs of `learn`")
    parser.add_argument("--pairs", type=int, default=None, help="measured A/B pairs (default: 5, smoke: 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets (needs --out)")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default: {DEFAULT_OUT})")
    parser.add_argument("--name", default=None, help="name of this run's folder (default: UTC time and git commit)")
    args = parser.parse_args(argv)

    if args.out is None and args.smoke:
        parser.error("--smoke writes to a separate results folder: pass --out")
    settings = SMOKE_SETTINGS if args.smoke else DEFAULT_SETTINGS
    if args.pairs is not None:
        if args.pairs < 1:
            parser.error(f"--pairs must be >= 1, got {args.pairs}")
        settings = Settings(**{**settings.__dict__, "pairs": args.pairs})
    th.set_num_threads(1)
    run_versions = versions()
    name = args.name or f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{run_versions['git_commit']}"
    run_dir = (args.out or DEFAULT_OUT) / name
    config = zoo_config(SWEEP_ENV)

    def save(section: str, rows: list[dict[str, Any]], **extra: Any) -> None:
        write_json(
            run_dir / f"{section}.json",
            {
                "section": section,
                "smoke": args.smoke,
                "created": timestamp(),
                "torch_threads": th.get_num_threads(),
                # Other processes on the machine inflate the times; the ratios of alternated pairs suffer less.
                "load_average": os.getloadavg(),
                "device": "cpu",
                "settings": {**settings.__dict__, "overrides": dict(settings.overrides)},
                "sweep_hyperparams": config.describe(),
                "versions": run_versions,
                "rows": rows,
                **extra,
            },
        )

    learn_rows: list[dict[str, Any]] = []
    floor_rows: list[dict[str, Any]] = []
    if "learn" in args.sections:
        learn_rows = measure_learn(tuple(args.envs), settings)
        save("learn", learn_rows, summary=learn_summary(learn_rows))
    if "floor" in args.sections:
        floor_rows = measure_floor(settings)
        save("floor", floor_rows, summary=floor_summary(learn_rows, floor_rows))
    if "batch" in args.sections:
        rows = measure_update_sweep(
            "batch_size", settings.batch_sizes, lambda size: {"n_steps": size // config.n_envs}, settings
        )
        save("batch", rows)
    if "width" in args.sections:
        rows = measure_update_sweep(
            "width",
            settings.widths,
            lambda width: {"policy_kwargs": {"net_arch": {"pi": [width, width], "vf": [width, width]}}},
            settings,
        )
        save("width", rows)
    if "n_envs" in args.sections:
        save("n_envs", measure_n_envs(settings))

    print(f"\nresults in {run_dir}")
    for env_id, entry in learn_summary(learn_rows).items():
        learn, train = entry["learn_ratio"], entry["train_ratio"]
        print(
            f"{env_id:16s} speed-up learn {learn[0]:.2f}/{learn[1]:.2f}/{learn[2]:.2f}, "
            f"train {train[0]:.2f}/{train[1]:.2f}/{train[2]:.2f} (min/median/max over {entry['pairs']} pairs)"
        )
    floor = floor_summary(learn_rows, floor_rows)
    if floor is not None:
        ratios = ", ".join(f"{impl} {floor[impl]['floor_ratio']:.2f}x" for impl in IMPLS)
        print(f"floor ratio {SWEEP_ENV} (bare step {floor['bare_us_per_step']:.1f} us per env step): {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
