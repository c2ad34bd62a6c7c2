"""Trust Region Policy Optimization for Stable-Baselines3."""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.save_util import recursive_getattr
from stable_baselines3.common.torch_layers import CombinedExtractor, FlattenExtractor
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, PyTorchObs, Schedule, TensorDict
from stable_baselines3.common.utils import explained_variance, is_vectorized_observation, obs_as_tensor, update_learning_rate
from stable_baselines3.common.vec_env import VecEnv
from torch.nn import functional as F

from sb3_trpo_ext.common.contrib_compat import kl_dimension_factor
from sb3_trpo_ext.common.critic import FastMlpCritic, SavedCritic, check_optimizer_state, optimizer_update
from sb3_trpo_ext.common.errors import UnsupportedActionSpaceError, UnsupportedObservationSpaceError
from sb3_trpo_ext.common.lean_policy import (
    PolicyStep,
    explain_undefined_distribution,
    make_buffer_add,
    make_lean_noise_reset,
    make_lean_policy_step,
    rollout_obs_tensor,
)
from sb3_trpo_ext.common.lean_vec_env import make_lean_env_step
from sb3_trpo_ext.common.mlp_fisher import MlpFisher
from sb3_trpo_ext.common.numerics import (
    DistParams,
    assign_flat_parameters,
    conjugate_gradient,
    fisher_weight_operator,
    flat_grad,
    flat_parameters,
    jacobian_transpose_vector,
    kl_old_new,
    maximal_step_size,
    tracked_tensors,
)
from sb3_trpo_ext.common.policy_utils import (
    all_finite,
    distribution_params,
    index_observations,
    optimizer_runs_as_defined,
    process_wide,
    runs_as_defined,
    split_actor_critic_parameters,
)
from sb3_trpo_ext.trpo.policies import CnnPolicy, MlpPolicy, MultiInputPolicy

SelfTRPO = TypeVar("SelfTRPO", bound="TRPO")

SUPPORTED_ACTION_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)
SUPPORTED_OBSERVATION_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary, spaces.Dict)


@dataclass
class PolicyStepStats:
    """
    What happened in one trust-region step of the policy.

    :param surrogate_before: Surrogate ``E[pi/pi_old * A]`` at the old parameters (1 up to the advantage mean)
    :param surrogate_after: Surrogate at the parameters kept after the step (equal to ``surrogate_before`` if rejected)
    :param kl: Mean KL(old || new) of the accepted step, ``None`` if no step was accepted
    :param accepted: Whether the line search accepted a step
    :param backtracks: Number of times the step was shrunk (``line_search_max_iter`` if none was accepted)
    :param cg_iterations: Conjugate-gradient iterations used
    :param cg_residual_norm: Norm of the final CG residual ``g - F x``
    :param step_size: The maximal step ``beta = sqrt(2 delta / x^T F x)`` (``nan`` if skipped before it)
    :param expected_improvement: First-order improvement ``g^T (beta x)`` predicted for the full step
    :param skipped: Why the step was skipped before the line search (``None`` if it was not)
    """

    surrogate_before: float = math.nan
    surrogate_after: float = math.nan
    kl: float | None = None
    accepted: bool = False
    backtracks: int = 0
    cg_iterations: int = 0
    cg_residual_norm: float = math.nan
    step_size: float = math.nan
    expected_improvement: float = math.nan
    skipped: str | None = None


#: sb3-contrib TRPO's methods a subclass may override, which this package does not call (its own steps differ)
_CONTRIB_ONLY_METHODS = ("hessian_vector_product", "_compute_actor_grad")


def _warn_contrib_overrides(cls: type) -> None:
    """Warn where a subclass defines sb3-contrib TRPO's methods, which would otherwise be ignored silently."""
    defined = [name for name in _CONTRIB_ONLY_METHODS if hasattr(cls, name)]
    if defined:
        warnings.warn(
            f"{cls.__name__} defines {', '.join(defined)}: sb3-contrib's TRPO calls these, this package does not. "
            "Override _surrogate, _fisher_vector_product_fn, _line_search or _critic_regression instead",
            stacklevel=3,
        )


def named_subspaces(observation_space: spaces.Space) -> list[tuple[str | None, spaces.Space]]:
    """``(key, subspace)`` of each entry of a Dict observation space; ``[(None, space)]`` for any other space."""
    if isinstance(observation_space, spaces.Dict):
        return list(observation_space.spaces.items())
    return [(None, observation_space)]


def _key_text(key: str | None) -> str:
    """`` (key 'name')`` for a Dict entry, nothing for a whole space."""
    return "" if key is None else f" (key {key!r})"


def _warn_for_shifted_actions(action_space: spaces.Space) -> None:
    """As SB3's ``check_env``: a (Multi)Discrete action space whose values do not start at 0 is not what SB3 samples."""
    if isinstance(action_space, (spaces.Discrete, spaces.MultiDiscrete)) and np.any(action_space.start != 0):
        warnings.warn(
            f"{type(action_space).__name__} action space {action_space} with a non-zero start "
            f"(start={action_space.start}): SB3's policies draw actions from 0 and the environment receives them "
            "unshifted; give the space start=0 and shift the actions in the environment (or a wrapper)",
            UserWarning,
            stacklevel=3,
        )


def _gymnasium_spaces(env: GymEnv) -> bool:
    """Whether the env's spaces are Gymnasium spaces (not those of an OpenAI Gym env, which SB3 converts)."""
    return isinstance(getattr(env, "observation_space", None), spaces.Space) and isinstance(
        getattr(env, "action_space", None), spaces.Space
    )


#: The hyperparameters that ``TRPO._validate_hyperparameters`` checks (its keyword arguments).
_VALIDATED = (
    "learning_rate",
    "n_steps",
    "batch_size",
    "gamma",
    "gae_lambda",
    "cg_max_steps",
    "cg_damping",
    "cg_residual_tol",
    "line_search_shrinking_factor",
    "line_search_max_iter",
    "n_critic_updates",
    "target_kl",
    "sub_sampling_factor",
    "use_sde",
    "sde_sample_freq",
    "normalize_advantage",
)


def _is_flag(value: object) -> bool:
    """A boolean, or 0 / 1: a string such as ``"False"`` would count as true."""
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1))


def _check_range(name: str, value: object, valid: bool, valid_range: str) -> None:
    if not valid:
        raise ValueError(f"Invalid hyperparameter {name}={value!r}: it must be {valid_range}")


class TRPO(OnPolicyAlgorithm):
    """
    Trust Region Policy Optimization (TRPO).

    Paper: https://arxiv.org/abs/1502.05477 (Schulman et al., 2015). A drop-in replacement of ``sb3_contrib.TRPO``:
    same parameters, names and defaults. Each update:

    1. surrogate ``L(theta') = E[pi_theta'(a|s) / pi_theta(a|s) * A(s, a)]`` and its gradient ``g``;
    2. ``x ~= F^-1 g`` by conjugate gradient started at zero, where ``F`` is the Fisher matrix (the Hessian of the mean
       KL at the old policy), applied through Fisher-vector products in Gauss-Newton form ``J^T M J v / N + damping v``
       (Jacobian of the distribution parameters ``J``, the distribution's analytic Fisher information ``M``);
    3. maximal step ``beta = sqrt(2 delta / x^T F x)``;
    4. backtracking line search ``theta + alpha^i beta x``: the first candidate with mean KL(old || new) <= ``target_kl``
       and a surrogate improvement is kept, the old parameters are restored if none is;
    5. critic regression: Adam on the value loss for ``n_critic_updates`` epochs of minibatches. Only critic parameters
       receive gradients, so the critic can never move the policy.

    KL direction: the constraint is ``KL(pi_old || pi_new)`` as in the paper (sb3-contrib checks ``KL(pi_new || pi_old)``).

    Actor parameters are found by structure: those the action distribution depends on. A features extractor shared
    between actor and critic (``share_features_extractor=True`` with a CNN, say) is therefore part of the actor: it is
    changed by the trust-region step only, and the critic fits its own head on top of it.

    Non-finite values in a rollout batch (a NaN reward, an infinite observation) skip the whole update with a warning;
    a non-finite gradient or a degenerate conjugate-gradient direction skips the policy step. Skipped steps leave the
    parameters bit-identical.

    :param policy: The policy model to use (MlpPolicy, CnnPolicy, MultiInputPolicy, or an ``ActorCriticPolicy`` class)
    :param env: The environment to learn from (if registered in Gymnasium, can be str)
    :param learning_rate: The learning rate of the critic's Adam optimizer, a constant or a schedule of the
        progress remaining (from 1 to 0)
    :param n_steps: The number of steps to run for each environment per update
        (the rollout buffer holds ``n_steps * n_envs`` samples)
    :param batch_size: Minibatch size of the critic regression
    :param gamma: Discount factor
    :param cg_max_steps: Maximal number of conjugate-gradient iterations
    :param cg_damping: Damping added to the Fisher matrix, ``F + cg_damping * I``
    :param line_search_shrinking_factor: Step-size reduction factor ``alpha`` of the line search
        (``theta_new = theta + alpha^i * beta * x``)
    :param line_search_max_iter: Maximal number of candidate steps of the backtracking line search
    :param n_critic_updates: Number of epochs of critic regression per policy update
    :param gae_lambda: Factor for trade-off of bias vs variance for the Generalized Advantage Estimator
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE)
    :param sde_sample_freq: Sample a new noise matrix every n steps when using gSDE
        (-1: only at the beginning of the rollout)
    :param rollout_buffer_class: Rollout buffer class to use. If ``None``, it will be automatically selected.
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation
    :param normalize_advantage: Whether to normalize the advantages (over the whole batch)
    :param target_kl: Trust-region radius ``delta``: bound on the mean KL(old || new) of an update, the KL of the
        whole action distribution (sb3-contrib's TRPO averages it over action dimensions: see
        :func:`~sb3_trpo_ext.from_sb3_contrib` to translate its settings)
    :param sub_sampling_factor: Use every k-th sample of the batch for the policy step
        (see pp. 40-42 of John Schulman's thesis, http://joschu.net/docs/thesis.pdf)
    :param stats_window_size: Window size for the rollout logging, specifying the number of episodes to average
        the reported success rate, mean episode length, and mean reward over
    :param tensorboard_log: The log location for tensorboard (if None, no logging)
    :param policy_kwargs: Additional arguments to be passed to the policy on creation
    :param verbose: The verbosity level: 0 no output, 1 info, 2 debug
    :param seed: Seed for the pseudo random generators
    :param device: Device (cpu, cuda, ...) on which the code should be run.
        Setting it to auto, the code will be run on the GPU if possible.
    :param cg_residual_tol: Conjugate gradient stops once the squared residual norm is below this value
        (new option; the default matches sb3-contrib's fixed tolerance)
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    #: Policy classes whose forward passes the specialised Fisher product and critic fit reproduce (subclasses excluded)
    _standard_policy_classes: ClassVar[tuple[type[BasePolicy], ...]] = (MlpPolicy, CnnPolicy, MultiInputPolicy)
    #: sb3-contrib policy base classes (by name: sb3-contrib is optional) that this class cannot run, and the class of
    #: this package that runs them
    _other_families: ClassVar[dict[str, str]] = {
        "RecurrentActorCriticPolicy": "RecurrentTRPO",
        "MaskableActorCriticPolicy": "MaskableTRPO",
    }
    policy: ActorCriticPolicy
    rollout_buffer: RolloutBuffer

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-3,
        n_steps: int = 2048,
        batch_size: int = 128,
        gamma: float = 0.99,
        cg_max_steps: int = 15,
        cg_damping: float = 0.1,
        line_search_shrinking_factor: float = 0.8,
        line_search_max_iter: int = 10,
        n_critic_updates: int = 10,
        gae_lambda: float = 0.95,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        normalize_advantage: bool = True,
        target_kl: float = 0.01,
        sub_sampling_factor: int = 1,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
        cg_residual_tol: float = 1e-10,
    ):
        self._validate_hyperparameters(
            learning_rate=learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            gamma=gamma,
            gae_lambda=gae_lambda,
            cg_max_steps=cg_max_steps,
            cg_damping=cg_damping,
            cg_residual_tol=cg_residual_tol,
            line_search_shrinking_factor=line_search_shrinking_factor,
            line_search_max_iter=line_search_max_iter,
            n_critic_updates=n_critic_updates,
            target_kl=target_kl,
            sub_sampling_factor=sub_sampling_factor,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            normalize_advantage=normalize_advantage,
        )
        _warn_contrib_overrides(type(self))
        if not isinstance(env, str) and env is not None and _gymnasium_spaces(env):
            # before SB3 wraps the env; an OpenAI Gym env's spaces are checked once SB3 has converted it (below)
            self._check_spaces(env.observation_space, env.action_space)
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=0.0,  # TRPO has no entropy bonus
            vf_coef=0.0,  # the critic is fitted separately
            max_grad_norm=0.0,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            device=device,
            seed=seed,
            _init_setup_model=False,
            supported_action_spaces=None,  # checked by _check_spaces, with a ValueError naming the space
        )
        if self.env is not None:
            self._check_spaces(self.observation_space, self.action_space)
            _warn_for_shifted_actions(self.action_space)
            buffer_size = self.env.num_envs * self.n_steps
            self._check_normalizable(normalize_advantage, n_steps, self.env.num_envs)
            if buffer_size % batch_size > 0:
                untruncated_batches = buffer_size // batch_size
                warnings.warn(
                    f"You have specified a mini-batch size of {batch_size},"
                    f" but because the `RolloutBuffer` is of size `n_steps * n_envs = {buffer_size}`,"
                    f" after every {untruncated_batches} untruncated mini-batches,"
                    f" there will be a truncated mini-batch of size {buffer_size % batch_size}\n"
                    f"We recommend using a `batch_size` that is a factor of `n_steps * n_envs`.\n"
                    f"Info: (n_steps={self.n_steps} and n_envs={self.env.num_envs})"
                )

        self.normalize_advantage = normalize_advantage
        self.batch_size = batch_size
        self.cg_max_steps = cg_max_steps
        self.cg_damping = cg_damping
        self.cg_residual_tol = cg_residual_tol
        self.line_search_shrinking_factor = line_search_shrinking_factor
        self.line_search_max_iter = line_search_max_iter
        self.target_kl = target_kl
        self.n_critic_updates = n_critic_updates
        self.sub_sampling_factor = sub_sampling_factor
        self._update_keys: set[str] = set()  # what the last update recorded in the logger

        if _init_setup_model:
            self._setup_model()

    # ----------------------------------------------------------------------------------------------------------
    # Input validation
    # ----------------------------------------------------------------------------------------------------------
    @staticmethod
    def _validate_hyperparameters(
        *,
        learning_rate: float | Schedule,
        n_steps: int,
        batch_size: int,
        gamma: float,
        gae_lambda: float,
        cg_max_steps: int,
        cg_damping: float,
        cg_residual_tol: float,
        line_search_shrinking_factor: float,
        line_search_max_iter: int,
        n_critic_updates: int,
        target_kl: float,
        sub_sampling_factor: int,
        use_sde: bool,
        sde_sample_freq: int,
        normalize_advantage: bool,
    ) -> None:
        """Raise a ``ValueError`` naming the first invalid hyperparameter, its value and the valid range."""

        def finite(x: float) -> bool:  # any real number (Python or NumPy), not a bool
            return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

        def integer(x: int, low: int) -> bool:  # an int or NumPy integer, not a bool or an integral float
            return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= low

        if not callable(learning_rate):
            valid = finite(learning_rate) and learning_rate >= 0.0
            _check_range("learning_rate", learning_rate, valid, "a finite number >= 0, or a schedule (a callable)")
        _check_range("n_steps", n_steps, integer(n_steps, 1), "an integer >= 1")
        _check_range("batch_size", batch_size, integer(batch_size, 1), "an integer >= 1")
        _check_range("gamma", gamma, finite(gamma) and 0.0 <= gamma <= 1.0, "in [0, 1]")
        _check_range("gae_lambda", gae_lambda, finite(gae_lambda) and 0.0 <= gae_lambda <= 1.0, "in [0, 1]")
        _check_range("cg_max_steps", cg_max_steps, integer(cg_max_steps, 1), "an integer >= 1")
        _check_range("cg_damping", cg_damping, finite(cg_damping) and cg_damping >= 0.0, "a finite number >= 0")
        _check_range("cg_residual_tol", cg_residual_tol, finite(cg_residual_tol) and cg_residual_tol >= 0.0, ">= 0")
        _check_range(
            "line_search_shrinking_factor",
            line_search_shrinking_factor,
            finite(line_search_shrinking_factor) and 0.0 < line_search_shrinking_factor < 1.0,
            "in the open interval (0, 1)",
        )
        _check_range("line_search_max_iter", line_search_max_iter, integer(line_search_max_iter, 1), "an integer >= 1")
        _check_range("n_critic_updates", n_critic_updates, integer(n_critic_updates, 0), "an integer >= 0")
        _check_range("target_kl", target_kl, finite(target_kl) and target_kl > 0.0, "a finite number > 0")
        _check_range("sub_sampling_factor", sub_sampling_factor, integer(sub_sampling_factor, 1), "an integer >= 1")

        _check_range("use_sde", use_sde, _is_flag(use_sde), "True or False")
        _check_range("normalize_advantage", normalize_advantage, _is_flag(normalize_advantage), "True or False")
        _check_range(
            "sde_sample_freq",
            sde_sample_freq,
            isinstance(sde_sample_freq, numbers.Integral) and not isinstance(sde_sample_freq, bool),
            "an integer (a new gSDE exploration matrix every sde_sample_freq steps; <= 0: only at rollout start)",
        )

    def _check_hyperparameters(self) -> None:
        """
        The constructor's checks on the model's current hyperparameters, which may have been set after it: by
        ``load`` (the saved file, ``custom_objects``; a ``MaskablePPO`` or ``RecurrentPPO`` file holds PPO's
        ``target_kl=None``), or by assignment, from a callback too. Called before anything is collected or updated.
        A learning-rate schedule is checked where it is used (:meth:`_checked_learning_rate`).
        """
        try:
            self._validate_hyperparameters(**{name: getattr(self, name) for name in _VALIDATED})
            if self.env is not None:
                self._check_normalizable(self.normalize_advantage, self.n_steps, self.env.num_envs)
        except ValueError as error:
            raise ValueError(
                f"{error}. It was set after the model was built (by load, from the saved file or custom_objects, by "
                "assignment, or with a new environment): set a valid one on the model, or pass it to load in "
                "custom_objects"
            ) from None
        rollout_buffer = getattr(self, "rollout_buffer", None)
        if rollout_buffer is not None and rollout_buffer.buffer_size != self.n_steps:
            raise ValueError(
                f"Invalid hyperparameter n_steps={self.n_steps!r}: the model's rollout buffer was built for "
                f"n_steps={rollout_buffer.buffer_size}, and n_steps cannot change on a built model. Set it back, or load the "
                f"model with custom_objects={{'n_steps': {self.n_steps!r}}}, which builds the buffer anew"
            )

    def _check_trainable_state(self) -> None:
        """
        Refuse to train from weights or an optimizer state that no update of this class produces (updates that would
        leave NaN or inf are skipped or undone): non-finite weights set or loaded from outside (``set_parameters``,
        ``load``, ``policy_kwargs`` such as ``log_std_init``, an assignment) would send NaN actions to the
        environments and skip every update, and an optimizer state of another network's shapes would be read past its
        ends by PyTorch's fused Adam kernel.
        """
        if not all_finite(list(self.policy.parameters())):  # one check per device; the names only when it fails
            bad = [name for name, param in self.policy.named_parameters() if not all_finite([param])]
            shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            raise ValueError(
                f"The policy's weights hold NaN or inf ({shown}): they were set or loaded from outside training "
                "(set_parameters, load, policy_kwargs such as log_std_init, an assignment); this class's updates never "
                "leave non-finite weights. Load or set finite weights before learn()"
            )
        optimizer = getattr(self.policy, "optimizer", None)
        if isinstance(optimizer, th.optim.Optimizer):
            check_optimizer_state(optimizer)

    def _checked_learning_rate(self, progress_remaining: float) -> float:
        """
        The learning rate from ``lr_schedule`` at ``progress_remaining``, taken as 0 where it is below (SB3's last
        update of a run whose ``total_timesteps`` is not a multiple of ``n_steps * n_envs`` has a negative progress,
        where a linear schedule such as RL Zoo's ``lin_1e-3`` would give a negative rate); a ``ValueError`` naming
        ``learning_rate`` if the schedule gives a value that is not a finite number >= 0 (NaN or infinity would turn
        the critic's weights into NaN through Adam, a negative rate would climb the value loss).
        """
        progress = max(progress_remaining, 0.0)
        value = self.lr_schedule(progress)
        valid = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= 0.0
        _check_range(
            "learning_rate",
            self.learning_rate,
            valid,
            f"a finite number >= 0, or a schedule returning one (it returned {value!r} at progress_remaining={progress!r})",
        )
        return value

    def _setup_lr_schedule(self) -> None:
        """SB3's, with the schedule's first value checked: the optimizer is built with it (at construction, by load)."""
        super()._setup_lr_schedule()
        self._checked_learning_rate(1.0)

    def _update_learning_rate(self, optimizers: list[th.optim.Optimizer] | th.optim.Optimizer) -> None:
        """SB3's, with the schedule's value checked (:meth:`_checked_learning_rate`) before anything uses it."""
        value = self._checked_learning_rate(self._current_progress_remaining)
        self.logger.record("train/learning_rate", value)
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            update_learning_rate(optimizer, value)

    @staticmethod
    def _check_normalizable(normalize_advantage: bool, n_steps: int, n_envs: int) -> None:
        """Raise a ``ValueError`` if advantages are to be normalized over a rollout of one sample."""
        if normalize_advantage and n_steps * n_envs <= 1:
            raise ValueError(
                f"Invalid hyperparameter n_steps={n_steps} with n_envs={n_envs}: n_steps * n_envs must be "
                "> 1 when normalize_advantage=True (the advantages of a single sample cannot be normalized)"
            )

    @staticmethod
    def _check_spaces(observation_space: spaces.Space, action_space: spaces.Space) -> None:
        """
        Raise a ``ValueError`` naming an observation or action space TRPO cannot handle (also an ``AssertionError``
        or ``NotImplementedError``, as SB3 raises for them).
        """
        if not isinstance(action_space, SUPPORTED_ACTION_SPACES):
            raise UnsupportedActionSpaceError(
                f"Unsupported action space {action_space}: TRPO supports Box, Discrete, MultiDiscrete and MultiBinary actions"
            )
        if isinstance(action_space, spaces.Box) and not (
            np.isfinite(action_space.low).all() and np.isfinite(action_space.high).all()
        ):
            # the Gaussian's draws are clipped to the bounds before they reach the environment
            raise UnsupportedActionSpaceError(
                f"Unsupported action space {action_space}: Box actions need finite lower and upper bounds "
                f"(low={action_space.low}, high={action_space.high})"
            )
        if isinstance(action_space, spaces.MultiBinary) and not isinstance(action_space.n, int):
            raise UnsupportedActionSpaceError(  # SB3's Bernoulli head takes n as a Python int
                f"Unsupported action space {action_space}: MultiBinary actions need n as an int, as in MultiBinary(3), "
                f"got n={action_space.n!r}; flatten a multi-dimensional one to "
                f"MultiBinary({int(np.prod(action_space.shape))}) and reshape the actions in the environment"
            )
        if isinstance(action_space, spaces.MultiDiscrete) and len(action_space.shape) != 1:
            raise UnsupportedActionSpaceError(
                f"Unsupported action space {action_space}: MultiDiscrete actions must be one-dimensional, got shape "
                f"{action_space.shape}; flatten the space to shape ({int(np.prod(action_space.shape))},) and reshape the "
                "actions in the environment"
            )
        named = named_subspaces(observation_space)
        if not isinstance(observation_space, SUPPORTED_OBSERVATION_SPACES) or any(
            not isinstance(s, SUPPORTED_OBSERVATION_SPACES) or isinstance(s, spaces.Dict) for _, s in named
        ):
            raise UnsupportedObservationSpaceError(
                f"Unsupported observation space {observation_space}: TRPO supports Box, Discrete, MultiDiscrete, "
                "MultiBinary observations, and a Dict of those"
            )
        for key, subspace in named:
            if isinstance(subspace, (spaces.Discrete, spaces.MultiDiscrete)) and np.any(subspace.start != 0):
                raise UnsupportedObservationSpaceError(  # SB3 one-hot encodes observations from 0
                    f"Unsupported observation space {observation_space}{_key_text(key)}: {type(subspace).__name__} "
                    f"observations must start at 0 (SB3 one-hot encodes values 0 to n - 1), got start={subspace.start}; "
                    "shift them in the environment (or a wrapper) and give the space start=0"
                )
            if isinstance(subspace, spaces.MultiDiscrete) and len(subspace.shape) != 1:  # SB3 one-hot encodes a 1-D nvec
                raise UnsupportedObservationSpaceError(
                    f"Unsupported observation space {observation_space}{_key_text(key)}: MultiDiscrete observations "
                    f"must be one-dimensional, got shape {subspace.shape}; flatten the space to shape "
                    f"({int(np.prod(subspace.shape))},)"
                )

    def _check_flattened_observations(self) -> None:
        """
        SB3's ``FlattenExtractor`` and ``CombinedExtractor`` flatten from dimension 1, so a 0-d Box observation (a
        batch of scalars) fails in the first rollout: name it at construction. A features extractor of the user's own
        may take it, and is left to do so.
        """
        names = ("features_extractor", "pi_features_extractor", "vf_features_extractor")
        extractors = [getattr(self.policy, name, None) for name in names]
        if not any(type(extractor) in (FlattenExtractor, CombinedExtractor) for extractor in extractors):
            return
        for key, subspace in named_subspaces(self.observation_space):
            if isinstance(subspace, spaces.Box) and len(subspace.shape) == 0:
                raise UnsupportedObservationSpaceError(
                    f"Unsupported observation space {self.observation_space}{_key_text(key)}: SB3's features "
                    "extractors need Box observations of at least one dimension, got shape (); use shape (1,) (e.g. "
                    "gymnasium.wrappers.ReshapeObservation(env, (1,))) or a features_extractor_class that takes scalars"
                )

    # ----------------------------------------------------------------------------------------------------------
    # Rollouts
    # ----------------------------------------------------------------------------------------------------------
    def _lean_policy_step(self) -> PolicyStep | None:
        """The rollout forward pass of :func:`make_lean_policy_step` for the current weights, or ``None``."""
        return make_lean_policy_step(self.policy, self.action_space, self.use_sde)

    def _generic_policy_step(self, obs_tensor: PyTorchObs) -> tuple[np.ndarray, th.Tensor, th.Tensor]:
        """The rollout step of SB3's ``collect_rollouts`` (for a policy a callback replaced at rollout start)."""
        actions, values, log_probs = self.policy(obs_tensor)
        return actions.cpu().numpy(), values, log_probs

    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        """
        Collect ``n_rollout_steps`` steps per environment into ``rollout_buffer``: SB3's ``collect_rollouts``
        (callbacks and their ``locals``, time-limit bootstrapping, episode statistics, VecNormalize, Dict observations)
        with the policy's forward pass replaced by :meth:`_lean_policy_step` where that applies. The lean step (and
        gSDE's in-rollout noise reset) is built after the callbacks' ``on_rollout_start``: it holds the policy's
        modules and parameter objects as they are then, and the standard deviations derived from ``log_std``. In-place
        changes to layer weights during the rollout are seen at once; a replaced module or parameter, or a change
        to ``log_std`` (in place too), from the next rollout on (SB3's generic path sees every change at once).
        """
        if self._lean_policy_step() is None:
            try:
                return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
            except ValueError as error:  # a NaN observation fails the distribution's argument check: say where
                explain_undefined_distribution(error, self._last_obs, self.policy)  # type: ignore[arg-type]
                raise
        assert self._last_obs is not None, "No previous observation was provided"
        self.policy.set_training_mode(False)
        n_steps = 0
        rollout_buffer.reset()
        add_to_buffer = make_buffer_add(rollout_buffer) or rollout_buffer.add
        env_step = make_lean_env_step(env) or env.step

        def noise_reset() -> Callable[[], None]:  # from gSDE's std as it is now
            return make_lean_noise_reset(self.policy, env.num_envs) or (lambda: self.policy.reset_noise(env.num_envs))

        if self.use_sde:
            noise_reset()()  # a new exploration matrix for the rollout (before the callbacks, as in SB3)
        callback.on_rollout_start()
        policy_step = self._lean_policy_step() or self._generic_policy_step
        reset_noise = noise_reset() if self.use_sde else None
        is_box = isinstance(self.action_space, spaces.Box)
        is_discrete = isinstance(self.action_space, spaces.Discrete)
        low, high = (self.action_space.low, self.action_space.high) if is_box else (None, None)  # type: ignore[attr-defined]
        while n_steps < n_rollout_steps:
            if reset_noise is not None and self.sde_sample_freq > 0 and n_steps % self.sde_sample_freq == 0:
                reset_noise()  # a new exploration matrix
            with th.no_grad():
                obs_tensor = rollout_obs_tensor(self._last_obs, self.device)  # type: ignore[arg-type]
                actions, values, log_probs = policy_step(obs_tensor)
            # Gaussian actions are unbounded: clip them to the action space for the environment (not in the buffer);
            # ndarray.clip is what np.clip calls, without its dispatch (np.minimum of np.maximum differs on -0.0)
            clipped_actions = actions.clip(low, high) if is_box else actions  # type: ignore[arg-type]
            new_obs, rewards, dones, infos = env_step(clipped_actions)
            self.num_timesteps += env.num_envs
            callback.update_locals(locals())
            if not callback.on_step():
                return False
            self._update_info_buffer(infos, dones)
            n_steps += 1
            if is_discrete:
                actions = actions.reshape(-1, 1)  # the buffer stores one column per action dimension
            # An episode cut by a time limit is not over: bootstrap its last reward with gamma * V(terminal obs)
            for idx, done in enumerate(dones):
                info = infos[idx]
                if done and info.get("terminal_observation") is not None and info.get("TimeLimit.truncated", False):
                    terminal_obs = self.policy.obs_to_tensor(info["terminal_observation"])[0]
                    with th.no_grad():
                        terminal_value = self.policy.predict_values(terminal_obs)[0]  # type: ignore[arg-type]
                    rewards[idx] += self.gamma * terminal_value
            add_to_buffer(self._last_obs, actions, rewards, self._last_episode_starts, values, log_probs)  # type: ignore[arg-type]
            self._last_obs = new_obs  # type: ignore[assignment]
            self._last_episode_starts = dones
        with th.no_grad():
            values = self.policy.predict_values(obs_as_tensor(new_obs, self.device))  # type: ignore[arg-type]
        rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    # ----------------------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------------------
    def _other_family_error(self, policy_class: Any) -> ValueError | None:
        """The error for a policy class of sb3-contrib's that another class of this package runs (else ``None``)."""
        bases = {base.__name__ for base in getattr(policy_class, "__mro__", ())}
        for base, algorithm in self._other_families.items():
            if base in bases:
                return ValueError(
                    f"{type(self).__name__} cannot train the policy class {policy_class.__name__}, an sb3-contrib "
                    f"{base}: use sb3_trpo_ext.{algorithm} (for a saved model: {algorithm}.load(path))"
                )
        return None

    def _setup_model(self) -> None:
        # load builds the policy from the saved file and custom_objects: a use_sde given there as a string would build
        # a gSDE policy (the other hyperparameters are checked before learning: a PPO file, target_kl=None, still loads)
        _check_range("use_sde", self.use_sde, _is_flag(self.use_sde), "True or False")
        try:
            super()._setup_model()
        except TypeError as error:  # e.g. a maskable policy, which takes no use_sde
            other_family = self._other_family_error(self.policy_class)
            if other_family is not None:
                raise other_family from error
            raise
        self._check_flattened_observations()
        self._reset_parameter_caches()

    def _reset_parameter_caches(self) -> None:
        """Forget the actor/critic split and the specialised products built for the current policy."""
        self._actor_params: list[th.nn.Parameter] | None = None
        self._critic_params: list[th.nn.Parameter] | None = None
        # None: not decided yet; False: the generic autograd path is used
        self._fast_critic: FastMlpCritic | bool | None = None
        self._mlp_fisher: MlpFisher | bool | None = None
        # What the caches were built from: (policy, optimizer, *parameters) and each parameter's requires_grad
        self._cached_for: tuple[list[Any], list[bool]] | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        """
        A copy (``copy.deepcopy``, pickle) starts without the caches of the original: they are keyed by the identity
        of parameter objects, which a copy replaces.
        """
        self.__dict__.update(state)
        self.__dict__.setdefault("_update_keys", set())  # a copy pickled by an earlier version
        self._reset_parameter_caches()

    def _refresh_parameter_caches(self) -> None:
        """
        Drop the caches of :meth:`_split_parameters`, :class:`MlpFisher` and :class:`FastMlpCritic` when what they
        were built from has changed since the last update: the policy object, its optimizer, its parameters, which
        of them require gradients, or whether its modules and its optimizer run as defined (:func:`runs_as_defined`,
        :func:`optimizer_runs_as_defined`: a user may replace ``model.policy`` or its optimizer, freeze layers, or add
        hooks between two calls to ``learn``). The key holds the objects themselves, compared by identity.
        """
        params = list(self.policy.parameters())
        objects = [self.policy, self.policy.optimizer, *params]
        flags = [p.requires_grad for p in params] + [
            runs_as_defined(self.policy),
            optimizer_runs_as_defined(self.policy.optimizer),
        ]
        cached = self._cached_for
        if cached is None or cached[1] != flags or len(cached[0]) != len(objects):
            changed = True
        else:
            changed = any(a is not b for a, b in zip(cached[0], objects))
        if changed:
            self._reset_parameter_caches()
            self._cached_for = (objects, flags)

    def _uses_standard_policy(self) -> bool:
        """
        Whether the policy is exactly one of the classes whose forward passes the specialised paths
        (:class:`MlpFisher`, :class:`FastMlpCritic`) write out. A subclass may override any of its methods
        (``predict_values``, ``_get_action_dist_from_latent``, ...), so it always takes the generic autograd path; so
        does a policy with hooks or parametrisations (:func:`runs_as_defined`).
        """
        return type(self.policy) in self._standard_policy_classes and runs_as_defined(self.policy)

    def _split_parameters(self, observations: PyTorchObs) -> tuple[list[th.nn.Parameter], list[th.nn.Parameter]]:
        """Actor and critic parameters of the current policy, found once by structure (see the class docstring)."""
        if self._actor_params is None or self._critic_params is None:
            self._actor_params, self._critic_params = split_actor_critic_parameters(self.policy, observations)
        return self._actor_params, self._critic_params

    def _surrogate(
        self, observations: PyTorchObs, actions: th.Tensor, old_log_prob: th.Tensor, advantages: th.Tensor
    ) -> tuple[th.Tensor, DistParams]:
        """
        Importance-sampled surrogate ``L = mean(pi(a|s) / pi_old(a|s) * A)`` at the current parameters.

        :return: ``L`` and the distribution parameters it was computed from
        """
        distribution = self.policy.get_distribution(observations)
        log_prob = distribution.log_prob(actions)
        ratio = th.exp(log_prob - old_log_prob)
        return (ratio * advantages).mean(), distribution_params(distribution)

    def _fisher_vector_product_fn(
        self, params: list[th.nn.Parameter], new: DistParams, old: DistParams, observations: PyTorchObs | None = None
    ) -> Callable[[th.Tensor], th.Tensor]:
        """
        Fisher-vector product ``v -> F v + damping v`` in Gauss-Newton form ``F = J^T M J / N``.

        At the old parameters the Hessian of the mean KL(old || new) is exactly ``J^T M J / N``: ``J`` is the Jacobian
        of the distribution parameters with respect to ``params`` and ``M`` the analytic Fisher information of each
        sample's distribution (:func:`fisher_weight_operator`). ``J v`` is obtained by differentiating the linear map
        ``u -> J^T u`` (the "double-vjp" trick), ``J^T w`` by one backward pass; ``F`` is never formed.

        :param params: Actor parameters
        :param new: Distribution parameters attached to the graph at the current (old) parameters
        :param old: The same, detached
        :param observations: The batch, for the specialised product of a standard MLP actor
            (:class:`MlpFisher`, used when it applies)
        :return: The function computing the damped Fisher-vector product of a flat vector
        """
        if self._mlp_fisher is None:
            standard = self._uses_standard_policy()
            built = MlpFisher.build(self.policy, self.observation_space, self.use_sde, params) if standard else None
            self._mlp_fisher = built if built is not None else False
        if isinstance(self._mlp_fisher, MlpFisher) and isinstance(observations, th.Tensor):
            # The same product written out for the standard MLP actor (tested against the generic one)
            self._mlp_fisher.prepare(observations, self.cg_damping)
            return self._mlp_fisher
        n_samples = new.tensors[0].shape[0]
        # A distribution tensor that no trainable parameter moves (a frozen log_std) has J = 0: left out of autograd
        tracked = tracked_tensors(new.tensors)
        outputs = [new.tensors[k] for k in tracked]
        dummies = [th.zeros_like(t, requires_grad=True) for t in outputs]
        jt_dummy = th.autograd.grad(outputs, params, grad_outputs=dummies, create_graph=True, allow_unused=True)
        jt_pairs = [(g, p) for g, p in zip(jt_dummy, params) if g is not None]
        damping = self.cg_damping
        fisher_weight = fisher_weight_operator(old)

        offsets = np.cumsum([0] + [p.numel() for p in params])
        index_of = {id(p): i for i, p in enumerate(params)}

        def fvp(vector: th.Tensor) -> th.Tensor:
            # v split into the shapes of the parameters J^T u depends on
            chunks = [vector[offsets[index_of[id(p)]] : offsets[index_of[id(p)] + 1]].view_as(p) for _, p in jt_pairs]
            jv_tracked = th.autograd.grad(
                [g for g, _ in jt_pairs], dummies, grad_outputs=chunks, retain_graph=True, allow_unused=True
            )
            from_tracked = {k: d for k, d in zip(tracked, jv_tracked) if d is not None}
            jv = [from_tracked[k] if k in from_tracked else th.zeros_like(t) for k, t in enumerate(new.tensors)]
            m_jv = fisher_weight(jv)
            return jacobian_transpose_vector(new, params, m_jv) / n_samples + damping * vector

        return fvp

    def _line_search(
        self,
        params: list[th.nn.Parameter],
        full_step: th.Tensor,
        observations: PyTorchObs,
        actions: th.Tensor,
        old_log_prob: th.Tensor,
        advantages: th.Tensor,
        old: DistParams,
        surrogate_before: float,
        stats: PolicyStepStats,
    ) -> None:
        """
        Backtracking line search: try ``theta_old + alpha^i * full_step`` for ``i = 0, 1, ...`` and keep the first
        candidate whose mean KL(old || new) <= ``target_kl`` and whose surrogate improves on the old one.
        If no candidate is accepted the old parameters are written back (bit-identical), also when evaluating a
        candidate raises. A candidate whose distribution parameters overflow (a huge ``target_kl`` allows huge steps)
        is evaluated without ``torch.distributions``' argument checks: its NaN or infinite KL or surrogate rejects it.
        """
        theta_old = flat_parameters(params)
        coefficient = 1.0
        accepted = False
        try:
            with th.no_grad(), process_wide(th.distributions.Distribution, "_validate_args", False):
                for i in range(self.line_search_max_iter):
                    assign_flat_parameters(params, theta_old + coefficient * full_step)
                    surrogate, new = self._surrogate(observations, actions, old_log_prob, advantages)
                    kl = kl_old_new(old, new).mean().item()
                    surrogate_value = surrogate.item()
                    # Acceptance rule: inside the trust region on the true KL, and a better surrogate (NaN fails both)
                    if kl <= self.target_kl and surrogate_before < surrogate_value < math.inf:
                        accepted = True
                        stats.accepted, stats.backtracks = True, i
                        stats.kl, stats.surrogate_after = kl, surrogate_value
                        return
                    coefficient *= self.line_search_shrinking_factor
        finally:
            if not accepted:
                with th.no_grad():
                    assign_flat_parameters(params, theta_old)
        stats.backtracks = self.line_search_max_iter
        stats.surrogate_after = surrogate_before

    def _policy_step(
        self, observations: PyTorchObs, actions: th.Tensor, old_log_prob: th.Tensor, advantages: th.Tensor
    ) -> PolicyStepStats:
        """One natural-gradient step of the policy inside the trust region (steps 1-4 of the class docstring)."""
        stats = PolicyStepStats()
        params, _ = self._split_parameters(observations)

        # 1. Surrogate and its gradient g
        surrogate, new = self._surrogate(observations, actions, old_log_prob, advantages)
        old = new.detach()
        stats.surrogate_before = surrogate.item()
        grad = flat_grad(surrogate, params, retain_graph=True)
        if not math.isfinite(stats.surrogate_before) or not all_finite([grad]):
            stats.skipped = "the surrogate or its gradient is not finite"
            stats.surrogate_after = stats.surrogate_before
            return stats

        # 2. x = F^-1 g by conjugate gradient from x0 = 0, with Fisher-vector products only
        fvp = self._fisher_vector_product_fn(params, new, old, observations)
        cg = conjugate_gradient(fvp, grad, max_iter=self.cg_max_steps, residual_tol=self.cg_residual_tol)
        stats.cg_iterations, stats.cg_residual_norm = cg.iterations, cg.residual_norm

        # 3. Maximal step on the quadratic trust region: beta = sqrt(2 delta / x^T F x)
        direction = cg.x
        step_size = math.nan
        if all_finite([direction]) and cg.iterations > 0:
            step_size = maximal_step_size(direction, fvp(direction), self.target_kl)
        if not math.isfinite(step_size):
            if cg.iterations == 0:  # CG stopped at x0 = 0: ||g||^2 <= cg_residual_tol
                stats.skipped = (
                    "the surrogate's gradient is zero (squared norm <= cg_residual_tol): there is no ascent direction, "
                    "e.g. every sampled action was the only valid one, or every advantage is 0"
                )
            else:
                stats.skipped = "degenerate conjugate-gradient direction (x^T F x <= 0 or not finite)"
            stats.surrogate_after = stats.surrogate_before
            return stats
        full_step = step_size * direction
        stats.step_size = step_size
        stats.expected_improvement = th.dot(grad, full_step).item()

        # 4. Backtracking line search on the true KL and surrogate
        self._line_search(
            params, full_step, observations, actions, old_log_prob, advantages, old, stats.surrogate_before, stats
        )
        return stats

    def _critic_regression(self, observations: PyTorchObs, returns: th.Tensor) -> list[float]:
        """
        Fit the value function to the returns by Adam on minibatches of ``batch_size``, ``n_critic_updates`` epochs.

        Gradients are computed for the critic parameters only (``torch.autograd.grad``); every actor parameter keeps
        ``grad=None``, which Adam skips, so the policy does not move.

        :return: The value loss of every minibatch
        """
        _, critic_params = self._split_parameters(observations)
        optimizer = self.policy.optimizer
        n_samples = returns.shape[0]
        losses: list[float] = []
        if not critic_params or self.n_critic_updates == 0:
            return losses
        if self._fast_critic is None:
            fast = (
                FastMlpCritic.build(self.policy.mlp_extractor, self.policy.value_net, critic_params, optimizer)
                if self._uses_standard_policy()
                else None
            )
            self._fast_critic = fast if fast is not None else False
        if isinstance(self._fast_critic, FastMlpCritic):
            # The critic's input features do not depend on critic parameters: compute them once for all epochs
            with th.no_grad():
                features = BasePolicy.extract_features(self.policy, observations, self.policy.vf_features_extractor)
            return self._fast_critic.fit(features, returns, self.batch_size, self.n_critic_updates)
        update = optimizer_update(optimizer, critic_params)  # Adam's fused kernel where it applies
        step_losses: list[th.Tensor] = []
        for _ in range(self.n_critic_updates):
            permutation = th.randperm(n_samples, device=returns.device)
            for start in range(0, n_samples, self.batch_size):
                indices = permutation[start : start + self.batch_size]
                values = self.policy.predict_values(index_observations(observations, indices)).flatten()
                value_loss = F.mse_loss(values, returns[indices])
                grads = th.autograd.grad(value_loss, critic_params)
                update(grads)
                step_losses.append(value_loss.detach())
        optimizer.zero_grad(set_to_none=True)
        return [float(x) for x in th.stack(step_losses).tolist()] if step_losses else []

    def _policy_batch_context(self, rollout_data: Any, rows: slice) -> AbstractContextManager[None]:
        """
        Hook for subclasses: make per-sample inputs of the policy step other than observations and actions (the
        action masks of :class:`~sb3_trpo_ext.MaskableTRPO`) available while the step runs.

        :param rollout_data: The whole rollout batch
        :param rows: The rows of the batch the policy step uses
        :return: A context manager active during the policy step (nothing to do for TRPO)
        """
        return nullcontext()

    def train(self) -> None:
        """Update the policy (one trust-region step) and the critic on the rollout buffer."""
        self._check_hyperparameters()
        self._forget_update_records()
        self._refresh_parameter_caches()
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)

        # The whole buffer as one batch (SB3's buffer computed the GAE advantages and returns)
        rollout_data = next(self.rollout_buffer.get(batch_size=None))
        observations, returns = rollout_data.observations, rollout_data.returns
        actions = rollout_data.actions
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        obs_tensors = list(observations.values()) if isinstance(observations, dict) else [observations]
        batch_fields = [*obs_tensors, actions.float(), rollout_data.old_log_prob, rollout_data.advantages, returns]

        self._n_updates += 1
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        if not all_finite(batch_fields):
            warnings.warn(
                f"{type(self).__name__}: the rollout batch holds non-finite values (NaN or inf in observations, rewards, "
                "values or log-probabilities); this update is skipped and the parameters are left unchanged",
                RuntimeWarning,
            )
            self._record_update("train/skipped_update", 1.0)
            return

        # Policy step on every sub_sampling_factor-th sample
        sub = slice(None, None, self.sub_sampling_factor)
        advantages = rollout_data.advantages[sub]
        if self.normalize_advantage and advantages.numel() > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        with self._policy_batch_context(rollout_data, sub):
            stats = self._policy_step(
                index_observations(observations, sub), actions[sub], rollout_data.old_log_prob[sub], advantages
            )
        if stats.skipped is not None:
            warnings.warn(
                f"{type(self).__name__}: policy step skipped: {stats.skipped}; the policy parameters are unchanged",
                RuntimeWarning,
            )

        value_losses = self._guarded_critic_regression(observations, returns)

        self._log_train_stats(stats, value_losses)

    def _guarded_critic_regression(self, observations: PyTorchObs, returns: th.Tensor) -> list[float]:
        """
        :meth:`_critic_regression`, undone where it leaves a critic weight or the optimizer's state for the critic
        non-finite: finite returns can still overflow float32 in Adam's second moment (the squared gradient; rewards
        of about 1e22 and up without reward normalisation), which would stop the critic for good (Adam's step is 0
        once its second moment is infinite). The critic and its optimizer state are then left as they were, with a
        warning and ``train/critic_update_skipped`` = 1. An infinite value loss alone (the squared error overflows
        first) is logged as it is: Adam's steps stay finite, and the critic learns. A state that was non-finite
        before the regression (a loaded model's) is not undone: it is not this update's doing, and undoing would
        freeze the critic for good.

        :return: The value loss of every minibatch
        """
        _, critic_params = self._split_parameters(observations)
        optimizer = self.policy.optimizer
        saved = SavedCritic(optimizer, critic_params)
        value_losses = self._critic_regression(observations, returns)
        if all_finite([*critic_params, *saved.state_tensors()]) or not saved.was_finite():
            return value_losses
        saved.restore()
        warnings.warn(
            f"{type(self).__name__}: the critic regression overflowed (a non-finite weight or optimizer state: returns "
            "too large for float32; VecNormalize(norm_reward=True) scales them); the critic and its optimizer state "
            "are left unchanged in this update",
            RuntimeWarning,
        )
        self._record_update("train/critic_update_skipped", 1.0)
        return value_losses

    def _record_update(self, key: str, value: float) -> None:
        """Record one statistic of this update; :meth:`_forget_update_records` removes it before the next update."""
        self.logger.record(key, value)
        self._update_keys.add(key)

    def _forget_update_records(self) -> None:
        """
        Remove what the previous update recorded from the logger, which keeps values until it dumps (every
        ``log_interval`` rollouts): a key an update does not record (the ``kl`` of a rejected step, ``skipped_update``)
        is then absent from the dump instead of showing an earlier update's value. Other keys are left alone.
        """
        tables = (self.logger.name_to_value, self.logger.name_to_count, self.logger.name_to_excluded)
        for key in self._update_keys:
            for table in tables:
                table.pop(key, None)
        self._update_keys.clear()

    def _log_train_stats(self, stats: PolicyStepStats, value_losses: list[float]) -> None:
        """Record the statistics of one update under ``train/``."""
        record = self._record_update
        record("train/surrogate_before", stats.surrogate_before)
        record("train/surrogate_after", stats.surrogate_after)
        if stats.kl is not None:  # only an accepted step has a KL: a rejected one is not logged as 0
            record("train/kl", stats.kl)
        record("train/line_search_success", float(stats.accepted))
        record("train/line_search_backtracks", stats.backtracks)
        record("train/policy_step_skipped", float(stats.skipped is not None))
        record("train/cg_iterations", stats.cg_iterations)
        record("train/cg_residual_norm", stats.cg_residual_norm)
        if math.isfinite(stats.step_size):
            record("train/step_size", stats.step_size)
            record("train/expected_improvement", stats.expected_improvement)
        if value_losses:
            record("train/value_loss", float(np.mean(value_losses)))
        record(
            "train/explained_variance",
            float(explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())),
        )
        log_std = getattr(self.policy, "log_std", None)
        if isinstance(log_std, th.Tensor):  # as SB3's PPO and sb3-contrib's TRPO: the policy after this update
            record("train/std", th.exp(log_std).mean().item())
        # sb3-contrib's keys with sb3-contrib's meanings, so that dashboards and callbacks written for it keep working.
        # Its KL is averaged over the dimensions of Box and MultiBinary actions (see from_sb3_contrib); a rejected
        # step has no KL, and is not logged as 0.
        record("train/policy_objective", stats.surrogate_after)
        record("train/is_line_search_success", float(stats.accepted))
        if stats.kl is not None:
            record("train/kl_divergence_loss", stats.kl / kl_dimension_factor(self.action_space))

    def learn(
        self: SelfTRPO,
        total_timesteps: int | float,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "TRPO_ext",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfTRPO:
        """
        Train the agent for ``total_timesteps`` environment steps (a float such as ``1e6`` is accepted).

        :param total_timesteps: The total number of samples (env steps) to train on
        :param callback: Callback(s) called at every step with state of the algorithm
        :param log_interval: The number of rollouts before logging
        :param tb_log_name: The name of the run for TensorBoard logging: runs go to ``<tensorboard_log>/TRPO_ext_<n>``
            by default, beside sb3-contrib's ``TRPO_<n>`` in a shared folder (RL Zoo's ``-tb`` shares one per
            environment), not numbered among them
        :param reset_num_timesteps: Whether or not to reset the current timestep number (used in logging)
        :param progress_bar: Display a progress bar using tqdm and rich
        :return: The trained model
        """
        if not isinstance(total_timesteps, (int, float, np.integer, np.floating)) or not math.isfinite(total_timesteps):
            raise ValueError(f"total_timesteps must be a finite number, got {total_timesteps!r}")
        if log_interval is not None and not (
            isinstance(log_interval, numbers.Integral) and not isinstance(log_interval, bool) and log_interval != 0
        ):
            raise ValueError(
                f"log_interval must be a non-zero integer (rollouts between two logs) or None, got {log_interval!r}"
            )
        if self.env is None:
            raise ValueError(
                f"This {type(self).__name__} has no environment to learn from (a loaded model has none unless given "
                "one): pass env= to load(), or call set_env(env) first"
            )
        # a model loaded with another family's policy (a RecurrentPPO file) predicts, but this class cannot train it
        other_family = self._other_family_error(type(self.policy))
        if other_family is not None:
            raise other_family
        self._check_hyperparameters()
        self._check_trainable_state()
        return super().learn(
            # as given, a float too: SB3 trains while num_timesteps < total_timesteps
            total_timesteps=total_timesteps,  # type: ignore[arg-type]
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """
        The policy's action for an observation (or a batch of them), as SB3's ``predict``. An observation holding NaN
        or inf, whose action distribution is undefined, gets a ``ValueError`` naming its index (torch's own
        distribution check, naming neither, is kept as the cause). ``RecurrentTRPO`` first checks ``state`` and
        ``episode_start`` against the observations and its LSTM.

        :param observation: The observation, or a batch of them
        :param state: The recurrent state (``RecurrentTRPO``; None otherwise)
        :param episode_start: Whether each observation starts an episode (``RecurrentTRPO``)
        :param deterministic: Whether to return the most likely action instead of a sample
        :return: The actions and the next state (None without recurrence)
        """
        self._check_predict_inputs(observation, state, episode_start)
        try:
            return super().predict(observation, state, episode_start, deterministic)
        except ValueError as error:
            self._explain_predict_error(error, observation)
            raise

    def _check_predict_inputs(self, observation: np.ndarray | dict[str, np.ndarray], state: Any, episode_start: Any) -> None:
        """Checks of ``predict``'s inputs before the policy sees them (``RecurrentTRPO`` checks its states)."""

    def _explain_predict_error(self, error: ValueError, observation: np.ndarray | dict[str, np.ndarray]) -> None:
        """Raise the clearer error for a NaN or inf observation in ``predict`` (else return: the caller re-raises)."""
        batch = self._observation_batch(observation)
        if batch is not None:
            explain_undefined_distribution(error, batch, self.policy, unit="observation")

    def _observation_batch(self, observation: np.ndarray | dict[str, np.ndarray]) -> np.ndarray | dict[str, np.ndarray] | None:
        """
        The observations ``predict`` is given as arrays with a batch axis (one observation gets one), or ``None`` where
        they do not fit the space (``policy.predict`` then raises its own error).
        """
        # as SB3's obs_to_tensor does before its own check: lists, tuples and Python numbers become arrays
        if isinstance(observation, dict):
            observation = {key: np.asarray(value) for key, value in observation.items()}
        else:
            observation = np.asarray(observation)
        try:
            if is_vectorized_observation(observation, self.observation_space):  # type: ignore[arg-type]
                return observation
        except (ValueError, KeyError):
            return None
        if isinstance(observation, dict):
            return {key: value[np.newaxis] for key, value in observation.items()}
        return observation[np.newaxis]

    def _observation_count(self, observation: np.ndarray | dict[str, np.ndarray]) -> int | None:
        """
        The number of observations ``predict`` is given (one unless it is a batch), which the masks (``MaskableTRPO``)
        or the LSTM states (``RecurrentTRPO``) must match; ``None`` where the observation does not fit the space.
        """
        batch = self._observation_batch(observation)
        if batch is None:
            return None
        first = next(iter(batch.values())) if isinstance(batch, dict) else batch
        return int(np.shape(first)[0])

    def set_parameters(
        self,
        load_path_or_dict: str | TensorDict,
        exact_match: bool = True,
        device: th.device | str = "auto",
    ) -> None:
        """
        Load parameters from a zip file or a nested dictionary (see ``get_parameters``), as SB3's ``set_parameters``,
        but all or nothing: when it raises (names or shapes that do not match with ``exact_match=True``, a broken
        file), the policy and its optimizer are left as they were. SB3's own ``set_parameters`` copies every tensor
        whose name matches before it finds the mismatch, which left a mix of two networks.

        :param load_path_or_dict: Location of the saved data (path or file-like, see ``save``), or a nested
            dictionary mapping object names (``"policy"``, ``"policy.optimizer"``) to their state dictionaries
        :param exact_match: If True, the given parameters must cover each module and each of its parameters
        :param device: Device on which the code should run
        """
        saved = []
        for name in self._get_torch_save_params()[0]:
            holder = recursive_getattr(self, name)
            saved.append((holder, copy.deepcopy(holder.state_dict())))
        try:
            super().set_parameters(load_path_or_dict, exact_match=exact_match, device=device)
        except BaseException:
            for holder, state in saved:
                holder.load_state_dict(state)
            raise

    def _excluded_save_params(self) -> list[str]:
        return [
            *super()._excluded_save_params(),
            "_update_keys",
            "_actor_params",
            "_critic_params",
            "_fast_critic",
            "_mlp_fisher",
            "_cached_for",
        ]
