"""
What the speed and returns benchmarks share: the two implementations, the RL Zoo's TRPO settings, environment and
model construction, and result files.

Both implementations get exactly the same hyperparameters, environments and seeds: everything here is built from
``rl_zoo3/hyperparams/trpo.yml`` (the zoo's settings for sb3-contrib's TRPO), and only the algorithm class differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch as th
import yaml
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecNormalize

#: Root of the benchmark package, and the default places of its outputs.
BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
RESULTS_DIR = BENCHMARKS_DIR / "results"
FIGURES_DIR = BENCHMARKS_DIR / "figures"

#: The implementations compared, in the order they appear in tables and plots.
IMPLS = ("sb3_trpo_ext", "sb3_contrib")

#: An extra arm of the returns benchmark (``--impls``): sb3_trpo_ext with the zoo's ``target_kl`` and ``cg_damping``
#: translated by :func:`sb3_trpo_ext.from_sb3_contrib`, i.e. with sb3-contrib's trust region (its KL is averaged over
#: action dimensions); every other setting is the zoo's.
MATCHED = "sb3_trpo_ext_contrib_kl"
RETURNS_IMPLS = (*IMPLS, MATCHED)

#: MuJoCo environments: the zoo only lists their -v4 versions; the -v5 ones use the same settings.
MUJOCO_ENVS = ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5", "Swimmer-v5", "Humanoid-v5")


def algorithm_class(impl: str) -> type[OnPolicyAlgorithm]:
    """
    The TRPO class of one implementation.

    :param impl: ``"sb3_trpo_ext"``, ``"sb3_contrib"`` or :data:`MATCHED` (this package's class).
    :return: the algorithm class.
    """
    if impl in ("sb3_trpo_ext", MATCHED):
        from sb3_trpo_ext import TRPO

        return TRPO
    if impl == "sb3_contrib":
        from sb3_contrib import TRPO as ContribTRPO

        return ContribTRPO
    raise ValueError(f"unknown implementation {impl!r}, expected one of {RETURNS_IMPLS}")


def zoo_hyperparams_file() -> Path:
    """
    :return: the RL Zoo's ``trpo.yml`` (the settings for sb3-contrib's TRPO) in the installed ``rl_zoo3``.
    """
    import rl_zoo3

    return Path(rl_zoo3.__file__).resolve().parent / "hyperparams" / "trpo.yml"


def zoo_key(env_id: str) -> str:
    """
    The key of an environment in the zoo's ``trpo.yml``: MuJoCo ``-v5`` environments use the ``-v4`` entries.

    :param env_id: a Gymnasium environment id.
    :return: the key to look up.
    """
    if env_id in MUJOCO_ENVS:
        return env_id.replace("-v5", "-v4")
    return env_id


@dataclass
class ZooConfig:
    """
    An environment's settings, parsed the way ``rl_zoo3.exp_manager.ExperimentManager`` parses them.

    :param env_id: the Gymnasium environment id.
    :param n_timesteps: the training budget.
    :param n_envs: number of training environments (``DummyVecEnv``, as in the zoo).
    :param normalize: wrap the environments in ``VecNormalize``.
    :param normalize_kwargs: keyword arguments of ``VecNormalize`` (``gamma`` is the algorithm's, as in the zoo).
    :param model_kwargs: constructor arguments of the algorithm, ``policy`` included.
    """

    env_id: str
    n_timesteps: int
    n_envs: int = 1
    normalize: bool = False
    normalize_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """
        :return: the settings as JSON-serializable values (classes and functions by name).
        """
        return {
            "env_id": self.env_id,
            "n_timesteps": self.n_timesteps,
            "n_envs": self.n_envs,
            "normalize": self.normalize,
            "normalize_kwargs": {key: _plain(value) for key, value in self.normalize_kwargs.items()},
            "model_kwargs": {key: _plain(value) for key, value in self.model_kwargs.items()},
        }


def _plain(value: Any) -> Any:
    """
    :param value: a hyperparameter value.
    :return: the value if JSON can hold it, else its name or ``repr``.
    """
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return getattr(value, "__name__", repr(value))


def zoo_config(env_id: str) -> ZooConfig:
    """
    The zoo's TRPO settings of one environment (``default`` when it is not listed), with ``normalize``,
    ``n_envs``, ``n_timesteps`` and ``policy_kwargs`` strings handled as ``ExperimentManager`` handles them.

    :param env_id: a Gymnasium environment id.
    :return: the parsed settings.
    """
    with open(zoo_hyperparams_file()) as file:
        all_params = yaml.safe_load(file)
    raw = dict(all_params.get(zoo_key(env_id), all_params["default"]))

    n_timesteps = int(raw.pop("n_timesteps"))
    n_envs = int(raw.pop("n_envs", 1))
    normalize: Any = raw.pop("normalize", False)
    normalize_kwargs: dict[str, Any] = {}
    if isinstance(normalize, str):
        normalize_kwargs = eval(normalize)
        normalize = True
    elif isinstance(normalize, dict):
        normalize_kwargs = dict(normalize)
        normalize = True
    if normalize and "gamma" in raw:
        normalize_kwargs["gamma"] = raw["gamma"]
    if isinstance(raw.get("policy_kwargs"), str):
        # The zoo evaluates these strings with torch.nn in scope as ``nn``.
        raw["policy_kwargs"] = eval(raw["policy_kwargs"], {"nn": th.nn, "dict": dict})
    return ZooConfig(
        env_id=env_id,
        n_timesteps=n_timesteps,
        n_envs=n_envs,
        normalize=bool(normalize),
        normalize_kwargs=normalize_kwargs,
        model_kwargs=raw,
    )


def make_train_env(config: ZooConfig, seed: int, n_envs: int | None = None, vec_env_cls: type[VecEnv] = DummyVecEnv) -> VecEnv:
    """
    The training environments, as the zoo builds them: ``make_vec_env`` (``Monitor`` on each) and ``VecNormalize``.

    :param config: the environment's settings.
    :param seed: seed of the first environment (the others get ``seed + i``).
    :param n_envs: number of environments, ``config.n_envs`` when ``None``.
    :param vec_env_cls: ``DummyVecEnv`` or ``SubprocVecEnv``.
    :return: the vectorized environment.
    """
    env = make_vec_env(config.env_id, n_envs=n_envs or config.n_envs, seed=seed, vec_env_cls=vec_env_cls)  # type: ignore[arg-type]
    if config.normalize:
        env = VecNormalize(env, **config.normalize_kwargs)
    return env


def make_eval_env(config: ZooConfig, seed: int) -> VecEnv:
    """
    One evaluation environment, as the zoo builds it: ``VecNormalize`` with frozen statistics (``training=False``)
    and raw rewards (``norm_reward=False``); ``EvalCallback`` copies the training statistics before each evaluation.

    :param config: the environment's settings.
    :param seed: seed of the environment.
    :return: the vectorized evaluation environment.
    """
    env = make_vec_env(config.env_id, n_envs=1, seed=seed)
    if config.normalize:
        env = VecNormalize(env, **{**config.normalize_kwargs, "training": False, "norm_reward": False})
    return env


def make_model(
    impl: str,
    config: ZooConfig,
    env: VecEnv,
    seed: int,
    algorithm: type[OnPolicyAlgorithm] | None = None,
    **overrides: Any,
) -> OnPolicyAlgorithm:
    """
    A TRPO model of one implementation with the zoo's settings.

    :param impl: ``"sb3_trpo_ext"``, ``"sb3_contrib"`` or :data:`MATCHED`.
    :param config: the environment's settings.
    :param env: the training environment.
    :param seed: the model's seed.
    :param algorithm: a subclass of the implementation's class to build instead (a probe).
    :param overrides: constructor arguments that replace the zoo's.
    :return: the model, on CPU.
    """
    kwargs = {**config.model_kwargs, **overrides}
    policy = kwargs.pop("policy")
    if impl == MATCHED:
        from sb3_trpo_ext import from_sb3_contrib

        kwargs = from_sb3_contrib(env.action_space, **kwargs)
    cls = algorithm or algorithm_class(impl)
    if not issubclass(cls, algorithm_class(impl)):
        raise TypeError(f"{cls.__name__} is not a subclass of {impl}'s {algorithm_class(impl).__name__}")
    return cls(policy, env, seed=seed, device="cpu", verbose=0, **kwargs)


def probe_arguments(parser: argparse.ArgumentParser, default_out: Path) -> None:
    """
    The arguments every training probe takes: ``--env``, ``--seed``, ``--steps`` and ``--out``.

    :param parser: the probe's parser.
    :param default_out: the probe's results folder.
    """
    parser.add_argument("--env", default="HalfCheetah-v5", help="environment id (with an RL Zoo TRPO entry)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the zoo's budget)")
    parser.add_argument("--out", type=Path, default=default_out, help=f"results folder (default: {default_out})")


def probe_steps(parser: argparse.ArgumentParser, steps: int | None, config: ZooConfig, updates: int = 1) -> int:
    """
    The training steps of a probe: ``--steps``, or the zoo's budget; a usage error naming ``--steps`` below the
    ``updates`` the probe needs (one rollout of ``n_steps * n_envs`` each).

    :param parser: the probe's parser.
    :param steps: ``--steps`` (``None``: not given).
    :param config: the environment's zoo settings.
    :param updates: the number of updates the probe needs to record anything.
    :return: the training steps.
    """
    rollout = int(config.model_kwargs.get("n_steps", 2048)) * config.n_envs
    if steps is None:
        return config.n_timesteps
    if steps < updates * rollout:
        parser.error(
            f"--steps must be at least {updates * rollout} ({updates} update{'s' if updates > 1 else ''} of "
            f"{rollout} steps on {config.env_id}), got {steps}"
        )
    return steps


def versions() -> dict[str, str | int | None]:
    """
    :return: versions of everything that decides a result, the git commit (``$BENCHMARK_SOURCE_COMMIT`` when set,
        for a snapshot outside git), a hash of ``sb3_trpo_ext``'s sources, and the machine.
    """
    import mujoco
    import sb3_contrib
    import stable_baselines3

    import sb3_trpo_ext

    package_dir = Path(sb3_trpo_ext.__file__).resolve().parent
    # The package's sources may be a snapshot outside git, or carry uncommitted edits: their hash says which code ran.
    digest = hashlib.sha256()
    for source in sorted(package_dir.rglob("*.py")):
        digest.update(source.relative_to(package_dir).as_posix().encode() + b"\0" + source.read_bytes())
    commit = os.environ.get("BENCHMARK_SOURCE_COMMIT")
    if commit is None:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=package_dir, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = None
    return {
        "sb3_trpo_ext": sb3_trpo_ext.__version__,
        "sb3_trpo_ext_sources_sha256": digest.hexdigest()[:16],
        "sb3_contrib": sb3_contrib.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "torch": th.__version__,
        "gymnasium": gym.__version__,
        "mujoco": mujoco.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """
    Write a result file atomically (a temporary file renamed into place), so that an interrupted run never leaves a
    half-written file that would count as finished.

    :param path: the destination.
    :param data: JSON-serializable content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any] | None:
    """
    :param path: a result file.
    :return: its content, or ``None`` when it is missing or unreadable.
    """
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def timestamp() -> str:
    """
    :return: the current UTC time, ISO 8601.
    """
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


__all__ = [
    "BENCHMARKS_DIR",
    "FIGURES_DIR",
    "IMPLS",
    "MATCHED",
    "MUJOCO_ENVS",
    "RESULTS_DIR",
    "RETURNS_IMPLS",
    "ZooConfig",
    "algorithm_class",
    "make_eval_env",
    "make_model",
    "make_train_env",
    "read_json",
    "timestamp",
    "versions",
    "write_json",
    "zoo_config",
    "zoo_key",
]
