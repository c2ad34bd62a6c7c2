"""
RL Zoo (``rl_zoo3``) integration: the only module of this package that knows about rl_zoo3.

After ``pip install sb3_trpo_ext[zoo]`` every zoo tool accepts ``--algo trpo_ext`` (and ``trpo_ext_mask`` /
``trpo_ext_lstm`` once :class:`sb3_trpo_ext.MaskableTRPO` / :class:`sb3_trpo_ext.RecurrentTRPO` exist), with the
hyperparameters shipped in ``sb3_trpo_ext/hyperparams/<key>.yml``. The zoo's own ``trpo`` key is left alone: it
keeps meaning sb3-contrib's TRPO, so both can be compared from the same command line.

Nothing here runs by itself: :mod:`sb3_trpo_ext._zoo_hook` (installed at interpreter start-up by a ``.pth`` file)
calls :func:`on_zoo_import` right after each of ``rl_zoo3.utils``, ``rl_zoo3.hyperparams_opt`` and
``rl_zoo3.exp_manager`` has executed. :func:`register` does the same by hand, for an interpreter started without
the site hook (``python -S``) or in which rl_zoo3 was imported before this package was installed.

This module imports neither rl_zoo3 nor torch at import time: both come in through the functions below, so that
importing it from the hook cannot create an import cycle.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from stable_baselines3.common.base_class import BaseAlgorithm

__all__ = [
    "HYPERPARAMS_DIR",
    "LSTM_HIDDEN_SIZES",
    "ZOO_ALGORITHMS",
    "ZooAlgorithm",
    "available_algorithms",
    "convert_trpo_ext_lstm_params",
    "convert_trpo_ext_params",
    "hyperparams_file",
    "on_zoo_import",
    "register",
    "sample_trpo_ext_lstm_params",
    "sample_trpo_ext_params",
]

#: Folder of the hyperparameter files shipped with the package, one ``<key>.yml`` per zoo key.
HYPERPARAMS_DIR = Path(__file__).resolve().parent / "hyperparams"
#: Attribute that marks the wrapped ``ExperimentManager.__init__``, so that patching stays idempotent.
_PATCH_MARKER = "_sb3_trpo_ext_patched"


def sample_trpo_ext_params(
    trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict[str, Any]
) -> dict[str, Any]:
    """
    Optuna sampler for ``--algo trpo_ext``: the zoo's TRPO search space, unchanged.

    :class:`sb3_trpo_ext.TRPO` takes the same constructor parameters as sb3-contrib's TRPO, so everything that
    ``rl_zoo3.hyperparams_opt.sample_trpo_params`` proposes is accepted, and studies of both keys are comparable.

    :param trial: the Optuna trial to sample from.
    :param n_actions: dimension of a continuous action space (0 otherwise), as passed by the zoo.
    :param n_envs: number of parallel environments, as passed by the zoo.
    :param additional_args: the zoo's extra sampler arguments (HER settings), as passed by the zoo.
    :return: keyword arguments for the algorithm's constructor.
    """
    from rl_zoo3.hyperparams_opt import sample_trpo_params

    return sample_trpo_params(trial, n_actions, n_envs, additional_args)


def convert_trpo_ext_params(sampled_params: dict[str, Any]) -> dict[str, Any]:
    """
    Turn the raw parameters of a stored Optuna trial into constructor arguments (``--trial-id``).

    :param sampled_params: ``trial.params`` of a trial sampled by :func:`sample_trpo_ext_params`.
    :return: keyword arguments for the algorithm's constructor.
    """
    from rl_zoo3.hyperparams_opt import convert_onpolicy_params

    return convert_onpolicy_params(sampled_params)


#: The LSTM sizes ``--algo trpo_ext_lstm`` tunes over (the values RL Zoo's commented-out RecurrentPPO space lists,
#: without 512).
LSTM_HIDDEN_SIZES = (16, 32, 64, 128, 256)
#: Keys of the stored trial parameters that go into ``policy_kwargs`` of a recurrent policy as they are.
_LSTM_KEYS = ("lstm_hidden_size", "enable_critic_lstm")


def sample_trpo_ext_lstm_params(
    trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict[str, Any]
) -> dict[str, Any]:
    """
    Optuna sampler for ``--algo trpo_ext_lstm``: the TRPO search space, plus the LSTM's size and whether the critic
    has an LSTM of its own. The sampled ``policy_kwargs`` replace those of the hyperparameter entry as a whole, so
    without them every trial would run sb3-contrib's default of 256 LSTM units (as the zoo's ``ppo_lstm`` sampler,
    which samples neither, does).

    :param trial: the Optuna trial to sample from.
    :param n_actions: dimension of a continuous action space (0 otherwise), as passed by the zoo.
    :param n_envs: number of parallel environments, as passed by the zoo.
    :param additional_args: the zoo's extra sampler arguments, as passed by the zoo.
    :return: keyword arguments for the algorithm's constructor.
    """
    hyperparams = sample_trpo_ext_params(trial, n_actions, n_envs, additional_args)
    hyperparams["policy_kwargs"].update(
        lstm_hidden_size=trial.suggest_categorical("lstm_hidden_size", LSTM_HIDDEN_SIZES),
        enable_critic_lstm=trial.suggest_categorical("enable_critic_lstm", [False, True]),
    )
    return hyperparams


def convert_trpo_ext_lstm_params(sampled_params: dict[str, Any]) -> dict[str, Any]:
    """
    :param sampled_params: ``trial.params`` of a trial sampled by :func:`sample_trpo_ext_lstm_params`.
    :return: keyword arguments for the algorithm's constructor (``--trial-id``).
    """
    params = dict(sampled_params)
    lstm = {key: params.pop(key) for key in _LSTM_KEYS if key in params}
    hyperparams = convert_trpo_ext_params(params)
    hyperparams["policy_kwargs"].update(lstm)
    return hyperparams


@dataclass(frozen=True)
class ZooAlgorithm:
    """
    One row of the registration table: a zoo ``--algo`` key and what it stands for.

    :param key: the ``--algo`` value, also the folder name under the log folder and the hyperparameter file name.
    :param class_name: the attribute of :mod:`sb3_trpo_ext` holding the algorithm class; a key whose class does not
        exist (yet) is not registered.
    :param sampler: the Optuna sampler, with the signature of the zoo's ``HYPERPARAMS_SAMPLER`` values.
    :param converter: turns stored trial parameters into constructor arguments (the zoo's ``HYPERPARAMS_CONVERTER``).
    :param masked_evaluation: whether the zoo's periodic evaluation (``--eval-freq``) must pass the evaluation
        environment's action masks to ``predict``, through sb3-contrib's ``MaskableEvalCallback``.
    """

    key: str
    class_name: str
    sampler: Callable[[optuna.Trial, int, int, dict[str, Any]], dict[str, Any]] = sample_trpo_ext_params
    converter: Callable[[dict[str, Any]], dict[str, Any]] = convert_trpo_ext_params
    masked_evaluation: bool = False

    @property
    def hyperparams_file(self) -> Path:
        """The packaged hyperparameter file read when no ``--conf-file`` is given."""
        return HYPERPARAMS_DIR / f"{self.key}.yml"


#: Every key this package may register; adding an algorithm to the zoo is one line here.
ZOO_ALGORITHMS: tuple[ZooAlgorithm, ...] = (
    ZooAlgorithm("trpo_ext", "TRPO"),
    ZooAlgorithm("trpo_ext_mask", "MaskableTRPO", masked_evaluation=True),
    ZooAlgorithm("trpo_ext_lstm", "RecurrentTRPO", sample_trpo_ext_lstm_params, convert_trpo_ext_lstm_params),
)


def available_algorithms(package: ModuleType | None = None) -> dict[str, type[BaseAlgorithm]]:
    """
    The rows of :data:`ZOO_ALGORITHMS` whose class exists, looked up now (classes added later are picked up).

    :param package: the module to look the classes up in; :mod:`sb3_trpo_ext` by default.
    :return: the algorithm class of each available key, in table order.
    """
    if package is None:
        package = importlib.import_module("sb3_trpo_ext")
    found = {row.key: getattr(package, row.class_name, None) for row in ZOO_ALGORITHMS}
    return {key: algorithm for key, algorithm in found.items() if algorithm is not None}


def hyperparams_file(key: str) -> Path | None:
    """
    The packaged hyperparameter file of a zoo key of this package.

    :param key: an ``--algo`` value.
    :return: ``sb3_trpo_ext/hyperparams/<key>.yml`` for a key of :data:`ZOO_ALGORITHMS`, None for any other key
        (the zoo's own algorithms keep their own files).
    """
    for row in ZOO_ALGORITHMS:
        if row.key == key:
            return row.hyperparams_file
    return None


def _register_algorithms(utils: ModuleType) -> None:
    """
    Add the available algorithms to ``rl_zoo3.utils.ALGOS``: the ``--algo`` choices of every zoo script.

    :param utils: the ``rl_zoo3.utils`` module.
    """
    utils.ALGOS.update(available_algorithms())


def _register_samplers(hyperparams_opt: ModuleType) -> None:
    """
    Add the Optuna samplers and converters of the available algorithms to ``rl_zoo3.hyperparams_opt``.

    :param hyperparams_opt: the ``rl_zoo3.hyperparams_opt`` module.
    """
    available = available_algorithms()
    rows = [row for row in ZOO_ALGORITHMS if row.key in available]
    hyperparams_opt.HYPERPARAMS_SAMPLER.update({row.key: row.sampler for row in rows})
    hyperparams_opt.HYPERPARAMS_CONVERTER.update({row.key: row.converter for row in rows})


def _patch_experiment_manager(exp_manager: ModuleType) -> None:
    """
    Make ``ExperimentManager`` read the packaged hyperparameter file of this package's keys, and evaluate the
    masked algorithm with its action masks.

    Without ``--conf-file`` the zoo reads ``rl_zoo3/hyperparams/<algo>.yml``, which does not exist for our keys.
    The wrapped constructor points ``self.config`` at :func:`hyperparams_file` instead, only for our keys and only
    when no ``config`` was given: ``--conf-file`` and the zoo's own algorithms behave exactly as before.

    :param exp_manager: the ``rl_zoo3.exp_manager`` module.
    """
    manager_class = exp_manager.ExperimentManager
    original_init = manager_class.__init__
    if getattr(original_init, _PATCH_MARKER, False):
        return
    signature = inspect.signature(original_init)

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        packaged = hyperparams_file(self.algo)
        if packaged is not None and signature.bind(self, *args, **kwargs).arguments.get("config") is None:
            self.config = str(packaged)

    original_create_callbacks = manager_class.create_callbacks

    @functools.wraps(original_create_callbacks)
    def create_callbacks(self: Any) -> None:
        original_create_callbacks(self)
        if any(row.key == self.algo and row.masked_evaluation for row in ZOO_ALGORITHMS):
            self.callbacks = [_with_action_masks(callback) for callback in self.callbacks]

    setattr(__init__, _PATCH_MARKER, True)
    manager_class.__init__ = __init__
    manager_class.create_callbacks = create_callbacks


def _with_action_masks(callback: Any) -> Any:
    """
    The zoo's ``EvalCallback`` (built by ``ExperimentManager.create_callbacks``) as sb3-contrib's
    ``MaskableEvalCallback`` with the same settings, so that evaluation episodes (and the best model kept on them)
    use the evaluation environment's action masks, as training does; any other callback is returned unchanged.

    :param callback: a callback of the experiment.
    :return: the callback to use.
    """
    from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
    from stable_baselines3.common.callbacks import EvalCallback

    if type(callback) is not EvalCallback:
        return callback
    # EvalCallback stores <log_path>/evaluations; the constructor appends that part again
    log_path = None if callback.log_path is None else os.path.dirname(callback.log_path)
    return MaskableEvalCallback(
        callback.eval_env,
        callback_on_new_best=callback.callback_on_new_best,
        callback_after_eval=callback.callback,  # EventCallback keeps it as .callback
        n_eval_episodes=callback.n_eval_episodes,
        eval_freq=callback.eval_freq,
        log_path=log_path,
        best_model_save_path=callback.best_model_save_path,
        deterministic=callback.deterministic,
        render=callback.render,
        verbose=callback.verbose,
        warn=callback.warn,
        use_masking=True,
    )


_HANDLERS: dict[str, Callable[[ModuleType], None]] = {
    "rl_zoo3.utils": _register_algorithms,
    "rl_zoo3.hyperparams_opt": _register_samplers,
    "rl_zoo3.exp_manager": _patch_experiment_manager,
}


def on_zoo_import(module: ModuleType) -> None:
    """
    Register with one rl_zoo3 module, right after it has executed (called by :mod:`sb3_trpo_ext._zoo_hook`).

    Idempotent; any module other than ``rl_zoo3.utils``, ``rl_zoo3.hyperparams_opt`` and ``rl_zoo3.exp_manager``
    is ignored.

    :param module: the rl_zoo3 module that has just been executed.
    """
    handler = _HANDLERS.get(module.__name__)
    if handler is not None:
        handler(module)


def register() -> None:
    """
    Register this package's algorithms with RL Zoo in the running interpreter, by hand.

    Not needed after a normal install (the start-up hook does it); useful under ``python -S``, or when rl_zoo3 was
    imported before the package was installed. Idempotent.
    """
    for name in _HANDLERS:
        on_zoo_import(importlib.import_module(name))
