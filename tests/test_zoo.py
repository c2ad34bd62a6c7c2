"""RL Zoo integration (``--algo trpo_ext``): the zoo's real command lines run as subprocesses on tiny budgets, the
packaged hyperparameter file checked against the zoo's ``trpo.yml``, and the start-up hook kept cheap and harmless.

The subprocesses run in a temporary folder, so they see the installed package (the ``.pth`` hook included), not the
source tree: these tests need ``pip install -e .`` (or a wheel install) first, as the README says.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
from argparse import Namespace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import optuna
import pytest
import yaml

from sb3_trpo_ext import TRPO, from_sb3_contrib
from sb3_trpo_ext.common.contrib_compat import kl_dimension_factor
from sb3_trpo_ext.zoo import (
    HYPERPARAMS_DIR,
    ZOO_ALGORITHMS,
    available_algorithms,
    hyperparams_file,
)

# Located, not imported: importing rl_zoo3 patches gymnasium's TimeLimit, which the rest of the suite must not inherit.
RL_ZOO3 = importlib.util.find_spec("rl_zoo3")
if RL_ZOO3 is None or RL_ZOO3.origin is None:
    pytest.skip("RL Zoo is an optional dependency: pip install sb3_trpo_ext[zoo]", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
ZOO_TRPO_YML = Path(RL_ZOO3.origin).resolve().parent / "hyperparams" / "trpo.yml"
PACKAGED_YML = HYPERPARAMS_DIR / "trpo_ext.yml"
MUJOCO_ENVS = [
    "HalfCheetah",
    "Hopper",
    "Walker2d",
    "Ant",
    "Swimmer",
    "Humanoid",
    "Reacher",
    "InvertedPendulum",
    "InvertedDoublePendulum",
]
# Optuna seeds whose first trials ask for short rollouts (n_steps <= 512): the zoo's TRPO space goes up to
# 4096 steps x 2 envs with mini-batches of 4, a minute of critic updates for a single trial.
RANDOM_SEED, TPE_SEED = 51, 35


def load_yaml(path: Path) -> dict[str, Any]:
    with open(path) as file:
        return yaml.safe_load(file)


def zoo(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run one zoo command line (``python -m rl_zoo3.train ...``, ``rl_zoo3 train ...``) and require success."""
    command = [str(arg) for arg in args]
    if command[0] == "python":
        command[0] = sys.executable
    elif command[0] == "rl_zoo3":
        script = Path(sys.executable).with_name("rl_zoo3")
        command[0] = str(script) if script.exists() else str(shutil.which("rl_zoo3"))
    # One torch thread per process: the machine's cores are shared with the rest of the suite.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    hint = ""
    if "invalid choice: 'trpo_ext'" in result.stderr:
        hint = "\n(trpo_ext is not registered: is sb3_trpo_ext installed, with `pip install -e .`?)"
    assert result.returncode == 0, (
        f"{' '.join(command)} exited with {result.returncode}{hint}\n"
        f"--- stdout ---\n{result.stdout[-5000:]}\n--- stderr ---\n{result.stderr[-5000:]}"
    )
    return result


def loaded_hyperparams_file(stdout: str) -> Path:
    """The hyperparameter file that ``rl_zoo3.train`` reports as ``Loading hyperparameters from: ...``."""
    match = re.search(r"^Loading hyperparameters from: (.+)$", stdout, flags=re.MULTILINE)
    assert match is not None, stdout[-3000:]
    return Path(match.group(1).strip())


def saved_run(stdout: str) -> Path:
    """The run folder that ``rl_zoo3.train`` reports as ``Saving to ...``."""
    match = re.search(r"^Saving to (.+)$", stdout, flags=re.MULTILINE)
    assert match is not None, stdout[-3000:]
    return Path(match.group(1).strip())


def read_saved_config(run: Path, env_id: str) -> dict[str, Any]:
    """The hyperparameters a zoo run saved in ``<run>/<env>/config.yml`` (an OrderedDict dump, read as enjoy does)."""
    with open(run / env_id / "config.yml") as file:
        return dict(yaml.load(file, Loader=yaml.UnsafeLoader))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module")
def trained(workdir: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One CartPole agent trained by the zoo, shared by enjoy, record_video, plots and continued training."""
    result = zoo(
        "python", "-m", "rl_zoo3.train", "--algo", "trpo_ext", "--env", "CartPole-v1",
        "-n", "256", "--seed", "3", "--eval-freq", "256", "--eval-episodes", "2", "-f", "logs",
        cwd=workdir,
    )  # fmt: skip
    return workdir / saved_run(result.stdout), result


# --- Registration -------------------------------------------------------------------------------------------------


def test_start_up_hook_is_installed_and_light(tmp_path: Path) -> None:
    code = (
        "import json, sys; import numpy; "
        "print(json.dumps({'modules': sorted(sys.modules), 'finders': [type(f).__name__ for f in sys.meta_path]}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    assert "ZooImportHook" in state["finders"], "the sb3_trpo_ext_zoo.pth start-up hook is not installed"
    assert "_sb3_trpo_ext_zoo_hook" in state["modules"]
    heavy = {"torch", "sb3_trpo_ext", "stable_baselines3", "rl_zoo3", "gymnasium", "optuna"}
    assert heavy.isdisjoint(state["modules"]), heavy & set(state["modules"])


def zoo_facts(log_folder: str) -> dict[str, Any]:
    """
    What the zoo sees of this package once imported. Runs in a subprocess (see :func:`facts`): importing rl_zoo3
    patches gymnasium's ``TimeLimit`` for the whole process, which the rest of the test suite must not inherit.
    """
    import warnings

    from rl_zoo3.exp_manager import ExperimentManager
    from rl_zoo3.hyperparams_opt import HYPERPARAMS_CONVERTER, HYPERPARAMS_SAMPLER
    from rl_zoo3.utils import ALGOS

    def name(thing: Any) -> str:
        return f"{thing.__module__}.{thing.__qualname__}"

    def manager(algo: str, **kwargs: Any) -> ExperimentManager:
        return ExperimentManager(Namespace(), algo, "CartPole-v1", log_folder, verbose=0, **kwargs)

    # Every entry of every hyperparameter file, through the zoo's own pre-processing (schedules, normalize,
    # policy_kwargs strings, n_envs...), then through the algorithm's constructor.
    build_failures = []
    for key, algorithm in available_algorithms().items():
        packaged = hyperparams_file(key)
        assert packaged is not None
        for env_id, entry in load_yaml(packaged).items():
            env = substitute_env(key, env_id, entry)
            try:
                hyperparams, *_ = manager(key)._preprocess_hyperparams(copy.deepcopy(entry))
                algorithm(env=env, device="cpu", **hyperparams)
            except Exception as error:
                build_failures.append(f"{key} {env_id}: {type(error).__name__}: {error}")
            finally:
                env.close()

    # What the zoo's TRPO search space proposes builds a TRPO, and `--trial-id` reloads the same arguments; for the
    # LSTM key, the sampled LSTM size and critic LSTM reach the policy.
    sampler_failures = []
    for key in ("trpo_ext", "trpo_ext_lstm"):
        if key not in HYPERPARAMS_SAMPLER:
            continue
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
        for _ in range(8):
            trial = study.ask()
            proposed = HYPERPARAMS_SAMPLER[key](trial, 1, 2, {})
            try:
                if HYPERPARAMS_CONVERTER[key](trial.params) != proposed:
                    raise ValueError("the converter does not give back the sampled arguments")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "mini-batch size ... truncated": the zoo's space allows it
                    model = ALGOS[key](
                        "MlpLstmPolicy" if key == "trpo_ext_lstm" else "MlpPolicy", "Pendulum-v1", device="cpu", **proposed
                    )
                if key == "trpo_ext_lstm":
                    sampled = (trial.params["lstm_hidden_size"], trial.params["enable_critic_lstm"])
                    built = (model.policy.lstm_actor.hidden_size, model.policy.lstm_critic is not None)
                    if sampled != built:
                        raise ValueError(f"sampled (LSTM size, critic LSTM) {sampled}, built {built}")
            except Exception as error:
                sampler_failures.append(f"{key} {trial.params}: {type(error).__name__}: {error}")
            study.tell(trial, 0.0)

    return {
        "algos": {key: name(algorithm) for key, algorithm in ALGOS.items()},
        "samplers": {key: name(sampler) for key, sampler in HYPERPARAMS_SAMPLER.items()},
        "converters": {key: name(converter) for key, converter in HYPERPARAMS_CONVERTER.items()},
        "configs": {
            "trpo_ext": manager("trpo_ext").config,
            "trpo": manager("trpo").config,
            "trpo_ext --conf-file trpo.yml": manager("trpo_ext", config=str(ZOO_TRPO_YML)).config,
            "trpo_ext_lstm": manager("trpo_ext_lstm").config,
        },
        "build_failures": build_failures,
        "sampler_failures": sampler_failures,
    }


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("facts")
    code = "import json, sys; from tests.test_zoo import zoo_facts; json.dump(zoo_facts(sys.argv[1]), open(sys.argv[2], 'w'))"
    command = [sys.executable, "-c", code, str(folder / "logs"), str(folder / "facts.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads((folder / "facts.json").read_text())


def test_zoo_keys(facts: dict[str, Any]) -> None:
    assert facts["algos"]["trpo_ext"] == "sb3_trpo_ext.trpo.trpo.TRPO"
    assert facts["algos"]["trpo"] == "sb3_contrib.trpo.trpo.TRPO"  # the zoo's own key is untouched
    assert facts["samplers"]["trpo_ext"] == "sb3_trpo_ext.zoo.sample_trpo_ext_params"
    assert facts["converters"]["trpo_ext"] == "sb3_trpo_ext.zoo.convert_trpo_ext_params"
    for key in ("trpo_ext_mask", "trpo_ext_lstm"):
        assert (key in facts["algos"]) == (key in available_algorithms())
        assert (key in facts["samplers"]) == (key in available_algorithms())
    if "trpo_ext_lstm" in facts["samplers"]:  # the LSTM's own search space, not the feed-forward one
        assert facts["samplers"]["trpo_ext_lstm"] == "sb3_trpo_ext.zoo.sample_trpo_ext_lstm_params"
        assert facts["converters"]["trpo_ext_lstm"] == "sb3_trpo_ext.zoo.convert_trpo_ext_lstm_params"


def test_experiment_manager_reads_the_packaged_file_only_for_our_keys(facts: dict[str, Any]) -> None:
    assert facts["configs"] == {
        "trpo_ext": str(PACKAGED_YML),
        "trpo": str(ZOO_TRPO_YML),
        "trpo_ext --conf-file trpo.yml": str(ZOO_TRPO_YML),
        "trpo_ext_lstm": str(hyperparams_file("trpo_ext_lstm")),
    }


def test_every_hyperparams_entry_builds_the_algorithm(facts: dict[str, Any]) -> None:
    assert facts["build_failures"] == []


def test_sampler_proposals_build_a_trpo(facts: dict[str, Any]) -> None:
    assert facts["sampler_failures"] == []


def test_registration_table_skips_missing_classes() -> None:
    package = types.ModuleType("fake_sb3_trpo_ext")
    package.TRPO = TRPO  # type: ignore[attr-defined]
    assert list(available_algorithms(package)) == ["trpo_ext"]
    package.MaskableTRPO = TRPO  # type: ignore[attr-defined]  # any class: only its presence matters here
    assert list(available_algorithms(package)) == ["trpo_ext", "trpo_ext_mask"]
    assert [row.key for row in ZOO_ALGORITHMS] == ["trpo_ext", "trpo_ext_mask", "trpo_ext_lstm"]


def test_broken_package_leaves_the_zoo_working(tmp_path: Path) -> None:
    # What a half-uninstalled package looks like to the hook: sb3_trpo_ext cannot be imported.
    code = (
        "import sys; sys.modules['sb3_trpo_ext'] = None\n"
        "import warnings; warnings.simplefilter('always')\n"
        "from rl_zoo3.utils import ALGOS\n"
        "import rl_zoo3.exp_manager\n"
        "assert 'trpo_ext' not in ALGOS and 'trpo' in ALGOS and 'ppo' in ALGOS, sorted(ALGOS)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("could not register its algorithms with RL Zoo") == 1  # not once per zoo module


def test_each_distinct_registration_failure_is_reported(tmp_path: Path) -> None:
    code = (
        "import sys, types, warnings; warnings.simplefilter('always')\n"
        "registrar = types.ModuleType('sb3_trpo_ext.zoo'); sys.modules['sb3_trpo_ext.zoo'] = registrar\n"
        "def on_zoo_import(module): raise RuntimeError(f'cannot handle {module.__name__}')\n"
        "registrar.on_zoo_import = on_zoo_import\n"
        "import rl_zoo3.exp_manager\n"  # imports rl_zoo3.utils and rl_zoo3.hyperparams_opt too
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("rl_zoo3.utils", "rl_zoo3.hyperparams_opt", "rl_zoo3.exp_manager"):
        assert result.stderr.count(f"RuntimeError: cannot handle {name})") == 1, result.stderr[-3000:]


@pytest.mark.slow
def test_register_by_hand_without_the_start_up_hook(tmp_path: Path) -> None:
    code = (
        "import _sb3_trpo_ext_zoo_hook; _sb3_trpo_ext_zoo_hook.uninstall()\n"  # as under `python -S`
        "from rl_zoo3.utils import ALGOS\n"
        "from rl_zoo3.exp_manager import ExperimentManager\n"
        "assert 'trpo_ext' not in ALGOS\n"
        "import argparse, sb3_trpo_ext.zoo as zoo; zoo.register(); zoo.register()\n"
        "from rl_zoo3.hyperparams_opt import HYPERPARAMS_SAMPLER\n"
        "assert ALGOS['trpo_ext'] is zoo.available_algorithms()['trpo_ext'] and 'trpo_ext' in HYPERPARAMS_SAMPLER\n"
        "manager = ExperimentManager(argparse.Namespace(), 'trpo_ext', 'CartPole-v1', 'logs', verbose=0)\n"
        "assert manager.config == str(zoo.hyperparams_file('trpo_ext')), manager.config\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-5000:]


# --- Hyperparameters ----------------------------------------------------------------------------------------------


#: Action dimensions of the zoo's PyBullet entries (pybullet_envs, which Gymnasium 1.x cannot make here): the number
#: of actuated joints of each robot.
PYBULLET_ACTION_DIMS = {
    "HalfCheetahBulletEnv-v0": 6,
    "AntBulletEnv-v0": 8,
    "Walker2DBulletEnv-v0": 6,
    "HopperBulletEnv-v0": 3,
    "ReacherBulletEnv-v0": 2,
    "MinitaurBulletEnv-v0": 8,
    "MinitaurBulletDuckEnv-v0": 8,
    "HumanoidBulletEnv-v0": 17,
    "InvertedDoublePendulumBulletEnv-v0": 1,
    "InvertedPendulumSwingupBulletEnv-v0": 1,
}


def action_space_of(env_id: str) -> gym.Space:
    if env_id in PYBULLET_ACTION_DIMS:
        return gym.spaces.Box(-1.0, 1.0, (PYBULLET_ACTION_DIMS[env_id],))
    env = gym.make(env_id)
    try:
        return env.action_space
    finally:
        env.close()


def contrib_experiment(env_id: str, zoo_entry: dict[str, Any]) -> dict[str, Any]:
    """The zoo's entry for sb3-contrib's TRPO in this package's units: target_kl and cg_damping times d for a Box."""
    space = action_space_of(env_id)
    if kl_dimension_factor(space) == 1:
        return zoo_entry
    return from_sb3_contrib(space, **zoo_entry)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the zoo's -v4 MuJoCo entries
def test_packaged_hyperparams_run_sb3_contribs_experiment_for_every_zoo_trpo_entry() -> None:
    zoo_entries, ours = load_yaml(ZOO_TRPO_YML), load_yaml(PACKAGED_YML)
    assert "default" in ours
    translated = 0
    for env_id, hyperparams in zoo_entries.items():
        assert env_id in ours, env_id
        if env_id == "default":
            assert ours[env_id] == hyperparams
            continue
        expected = contrib_experiment(env_id, hyperparams)
        assert ours[env_id] == expected, env_id
        translated += expected != hyperparams
    assert translated == 17  # every Box entry of d > 1: LunarLanderContinuous, BipedalWalker(Hardcore), 6 MuJoCo, 8 PyBullet


@pytest.mark.parametrize("name", MUJOCO_ENVS)
def test_mujoco_v5_entries_carry_the_v4_values(name: str) -> None:
    zoo_entries, ours = load_yaml(ZOO_TRPO_YML), load_yaml(PACKAGED_YML)
    # Environments without a tuned -v4 entry get the zoo's MuJoCo defaults (the `&mujoco-defaults` anchor, Ant-v4).
    zoo_entry = zoo_entries.get(f"{name}-v4", zoo_entries["Ant-v4"])
    assert ours[f"{name}-v5"] == contrib_experiment(f"{name}-v5", zoo_entry)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("env_id", ["LunarLanderContinuous-v3", "HalfCheetah-v5", "Humanoid-v5", "Pendulum-v1", "CartPole-v1"])
def test_returns_benchmarks_translated_arm_runs_the_packaged_settings(env_id: str) -> None:
    """The returns benchmark's arm `sb3_trpo_ext_contrib_kl` (the zoo's settings through from_sb3_contrib) trains with
    what `--algo trpo_ext` reads from the packaged file: its results are those of the shipped settings."""
    import inspect

    from benchmarks.common import zoo_config

    config = zoo_config(env_id)
    matched = from_sb3_contrib(action_space_of(env_id), **config.model_kwargs)
    packaged = dict(load_yaml(PACKAGED_YML)[env_id])
    for key in ("n_timesteps", "n_envs", "normalize"):  # read by the zoo, not TRPO's arguments
        packaged.pop(key, None)
    defaults = inspect.signature(TRPO.__init__).parameters
    packaged = {"target_kl": defaults["target_kl"].default, "cg_damping": defaults["cg_damping"].default, **packaged}
    assert matched == packaged


@pytest.mark.parametrize("key", [row.key for row in ZOO_ALGORITHMS])
def test_every_key_has_its_hyperparams_file_in_the_package_and_the_repository(key: str) -> None:
    packaged = hyperparams_file(key)
    assert packaged is not None and packaged.parent == HYPERPARAMS_DIR
    assert "default" in load_yaml(packaged)
    # hyperparams/ at the top of the repository links to the packaged files: one source, no drift.
    assert (ROOT / "hyperparams" / packaged.name).read_bytes() == packaged.read_bytes()


def substitute_env(key: str, env_id: str, hyperparams: dict[str, Any]) -> gym.Env:
    """The environment itself when it can be made here, else a stand-in with the same kind of actions."""
    try:
        return gym.make(env_id, **hyperparams.get("env_kwargs", {}))
    except (gym.error.Error, ImportError, OSError):
        # Masking is for discrete actions; the other entries are MuJoCo / PyBullet tasks, with continuous actions.
        return gym.make("CartPole-v1" if key == "trpo_ext_mask" else "Pendulum-v1")


# --- Command lines ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_reads_the_packaged_hyperparameters(trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run, result = trained
    # The installed package's file (the same path as PACKAGED_YML for an editable install; for a wheel installed
    # beside this checkout, the copy in site-packages).
    loaded = loaded_hyperparams_file(result.stdout)
    assert loaded.parts[-3:] == ("sb3_trpo_ext", "hyperparams", "trpo_ext.yml")
    assert loaded.read_bytes() == PACKAGED_YML.read_bytes()
    assert run.parent.name == "trpo_ext" and run.name == "CartPole-v1_1"
    assert read_saved_config(run, "CartPole-v1") == load_yaml(PACKAGED_YML)["CartPole-v1"]
    for name in ("CartPole-v1.zip", "best_model.zip", "evaluations.npz", "0.monitor.csv", "CartPole-v1/args.yml"):
        assert (run / name).exists(), name
    model = TRPO.load(run / "CartPole-v1.zip", device="cpu")
    assert model.num_timesteps >= 256


@pytest.mark.slow
def test_continue_training_from_a_saved_agent(trained: tuple[Path, subprocess.CompletedProcess[str]], workdir: Path) -> None:
    run, _ = trained
    result = zoo(
        "rl_zoo3", "train", "--algo", "trpo_ext", "--env", "CartPole-v1", "-n", "256", "--eval-freq", "-1",
        "-f", "continued", "-i", run / "CartPole-v1.zip",
        cwd=workdir,
    )  # fmt: skip
    assert "Loading pretrained agent" in result.stdout
    before = TRPO.load(run / "CartPole-v1.zip", device="cpu").policy.state_dict()
    after = TRPO.load(workdir / saved_run(result.stdout) / "CartPole-v1.zip", device="cpu").policy.state_dict()
    assert before.keys() == after.keys()
    assert any(not (before[name] == after[name]).all() for name in before), "the loaded agent was not trained further"


@pytest.mark.slow
def test_enjoy(trained: tuple[Path, subprocess.CompletedProcess[str]], workdir: Path) -> None:
    run, _ = trained
    result = zoo(
        "python", "-m", "rl_zoo3.enjoy", "--algo", "trpo_ext", "--env", "CartPole-v1", "-f", "logs/", "--no-render",
        "-n", "200", "--exp-id", "1",
        cwd=workdir,
    )  # fmt: skip
    assert f"Loading {run.relative_to(workdir) / 'CartPole-v1.zip'}" in result.stdout
    assert "Mean reward" in result.stdout


@pytest.mark.slow
def test_record_video(trained: tuple[Path, subprocess.CompletedProcess[str]], workdir: Path) -> None:
    for module in ("moviepy", "pygame"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"record_video needs {module} (pip install sb3_trpo_ext[zoo])")
    zoo(
        "python", "-m", "rl_zoo3.record_video", "--algo", "trpo_ext", "--env", "CartPole-v1", "-f", "logs/",
        "-n", "50", "--exp-id", "1", "-o", "videos",
        cwd=workdir,
    )  # fmt: skip
    assert list((workdir / "videos").glob("*trpo_ext-CartPole-v1*.mp4"))


@pytest.mark.slow
def test_plot_train(trained: tuple[Path, subprocess.CompletedProcess[str]], workdir: Path) -> None:
    result = zoo(
        "python", "-m", "rl_zoo3.plots.plot_train", "--algo", "trpo_ext", "--env", "CartPole-v1", "-f", "logs/",
        "-w", "2",
        cwd=workdir,
    )  # fmt: skip
    assert "No artists with labels" not in result.stderr, "plot_train found no trpo_ext training curve"


@pytest.mark.slow
def test_conf_file_with_the_zoo_trpo_yml(tmp_path: Path) -> None:
    result = zoo(
        "python", "-m", "rl_zoo3.train", "--algo", "trpo_ext", "--env", "CartPole-v1", "-n", "256",
        "--eval-freq", "-1", "--conf-file", ZOO_TRPO_YML,
        cwd=tmp_path,
    )  # fmt: skip
    assert loaded_hyperparams_file(result.stdout) == ZOO_TRPO_YML
    assert read_saved_config(tmp_path / saved_run(result.stdout), "CartPole-v1") == load_yaml(ZOO_TRPO_YML)["CartPole-v1"]


@pytest.mark.slow
def test_subproc_vec_env(tmp_path: Path) -> None:
    result = zoo(
        "python", "-m", "rl_zoo3.train", "--algo", "trpo_ext", "--env", "CartPole-v1", "-n", "256",
        "--eval-freq", "-1", "--vec-env", "subproc", "-params", "n_envs:4", "n_steps:64",
        cwd=tmp_path,
    )  # fmt: skip
    assert "Using 4 environments" in result.stdout
    run = tmp_path / saved_run(result.stdout)
    assert sorted(path.name for path in run.glob("*.monitor.csv")) == [f"{i}.monitor.csv" for i in range(4)]


@pytest.mark.slow
def test_mujoco_v5_with_progress_bar_and_seed(tmp_path: Path) -> None:
    pytest.importorskip("mujoco")
    result = zoo(
        "python", "-m", "rl_zoo3.train", "--algo", "trpo_ext", "--env", "HalfCheetah-v5", "-P", "--seed", "3",
        "-n", "256", "--eval-freq", "-1",
        cwd=tmp_path,
    )  # fmt: skip
    assert "Seed: 3" in result.stdout
    config = read_saved_config(tmp_path / saved_run(result.stdout), "HalfCheetah-v5")
    assert config == load_yaml(PACKAGED_YML)["HalfCheetah-v5"]


MASKED_ENVS_MODULE = """
import gymnasium as gym
import numpy as np

gym.register(
    "InvalidActionEnvDiscrete-v0",
    entry_point="sb3_contrib.common.envs:InvalidActionEnvDiscrete",
    kwargs={"dim": 4, "n_invalid_actions": 2},
    max_episode_steps=50,
)


class OnlyLastActionValid(gym.Env):
    # Raises on any action its mask forbids: an evaluation without masks fails.

    observation_space = gym.spaces.Box(-1, 1, (2,))
    action_space = gym.spaces.Discrete(5)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def action_masks(self):
        return [False, False, False, False, True]

    def step(self, action):
        assert int(action) == 4, f"masked action {action} taken"
        return self.observation_space.sample(), 1.0, False, False, {}


gym.register("OnlyLastActionValid-v0", entry_point=OnlyLastActionValid, max_episode_steps=20)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "env_id"), [("trpo_ext_mask", "InvalidActionEnvDiscrete-v0"), ("trpo_ext_lstm", "CartPoleNoVel-v1")]
)
def test_train_the_other_keys(key: str, env_id: str, tmp_path: Path) -> None:
    if key not in available_algorithms():
        pytest.skip(f"{key}: its class is not in sb3_trpo_ext yet")
    # An environment with an `action_masks()` method, registered by a module given to `--gym-packages`.
    (tmp_path / "masked_envs.py").write_text(MASKED_ENVS_MODULE)
    result = zoo(
        "python", "-m", "rl_zoo3.train", "--algo", key, "--env", env_id, "--gym-packages", "masked_envs",
        "-n", "128", "--eval-freq", "-1", "-params", "n_steps:128", "batch_size:64",
        cwd=tmp_path,
    )  # fmt: skip
    loaded, packaged = loaded_hyperparams_file(result.stdout), hyperparams_file(key)
    assert packaged is not None and loaded.name == packaged.name and loaded.read_bytes() == packaged.read_bytes()
    run = tmp_path / saved_run(result.stdout)
    assert run.parent.name == key
    assert type(available_algorithms()[key].load(run / f"{env_id}.zip", device="cpu")) is available_algorithms()[key]


@pytest.mark.slow
def test_masked_key_evaluates_with_the_action_masks(tmp_path: Path) -> None:
    # The zoo builds a plain EvalCallback; for trpo_ext_mask it must pass the masks, or this environment raises
    (tmp_path / "masked_envs.py").write_text(MASKED_ENVS_MODULE)
    result = zoo(
        "python", "-m", "rl_zoo3.train", "--algo", "trpo_ext_mask", "--env", "OnlyLastActionValid-v0",
        "--gym-packages", "masked_envs", "-n", "256", "--eval-freq", "64", "--eval-episodes", "2",
        "-params", "n_steps:64", "batch_size:64", "n_envs:1",
        cwd=tmp_path,
    )  # fmt: skip
    run = tmp_path / saved_run(result.stdout)
    evaluations = np.load(run / "evaluations.npz")
    assert len(evaluations["timesteps"]) == 4
    assert (evaluations["results"] == 20.0).all()  # every evaluation episode ran its 20 steps with the valid action


def finished_trials(report_folder: Path, sampler: str) -> list[dict[str, str]]:
    (report,) = report_folder.glob(f"report_Pendulum-v1_2-trials-256-{sampler}-*.csv")
    with open(report) as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sampler", "options"),
    [
        ("random", ["--seed", str(RANDOM_SEED), "--n-jobs", "2"]),
        # One start-up trial, so that the second trial comes from TPE's model rather than from random sampling.
        ("tpe", ["--seed", str(TPE_SEED), "--n-startup-trials", "1"]),
    ],
)
def test_optimize(sampler: str, options: list[str], tmp_path: Path) -> None:
    result = zoo(
        "python", "-m", "rl_zoo3.train", "--algo", "trpo_ext", "--env", "Pendulum-v1", "-optimize",
        "--n-trials", "2", "--sampler", sampler, *options, "-n", "256", "--n-evaluations", "1",
        "--eval-episodes", "1", "--no-optim-plots",
        cwd=tmp_path,
    )  # fmt: skip
    assert f"Sampler: {sampler}" in result.stdout
    trials = finished_trials(tmp_path / "logs" / "trpo_ext", sampler)
    assert [trial["state"] for trial in trials] == ["COMPLETE", "COMPLETE"]


def optuna_cli() -> str:
    script = Path(sys.executable).with_name("optuna")
    return str(script) if script.exists() else str(shutil.which("optuna"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["journal", "sqlite"])
def test_two_workers_share_one_study(backend: str, tmp_path: Path) -> None:
    study_name = "shared-trpo-ext"
    if backend == "journal":
        # The zoo opens a `--storage` path ending in `.log` as an Optuna journal file, safe for concurrent workers.
        storage_arg = str(tmp_path / "optuna" / "study.log")
    else:
        # A database URL (SQLite here, PostgreSQL across machines): the study is created once, before the workers
        # start, as the README says (two workers creating the database tables at the same time collide).
        storage_arg = f"sqlite:///{tmp_path / 'study.db'}"
        subprocess.run(
            [optuna_cli(), "create-study", "--storage", storage_arg, "--study-name", study_name, "--direction", "maximize"],
            check=True,
            capture_output=True,
            timeout=120,
        )
    command = [
        sys.executable, "-m", "rl_zoo3.train", "--algo", "trpo_ext", "--env", "Pendulum-v1", "-optimize",
        "--n-trials", "1", "--sampler", "random", "-n", "256", "--n-evaluations", "1", "--eval-episodes", "1",
        "--no-optim-plots", "--storage", storage_arg, "--study-name", study_name,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [*command, "--seed", str(RANDOM_SEED + worker), "-f", f"worker{worker}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for worker in range(2)
    ]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-5000:]

    storage: Any = storage_arg
    if backend == "journal":
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage_arg))
    study = optuna.load_study(study_name=study_name, storage=storage)
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(re.search(r"Trial \d finished", output) for output in outputs), "each worker ran one trial"
