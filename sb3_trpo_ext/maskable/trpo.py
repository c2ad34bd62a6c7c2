"""TRPO with invalid-action masking, for Stable-Baselines3."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.maskable.buffers import MaskableDictRolloutBuffer, MaskableRolloutBuffer
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from sb3_contrib.common.maskable.utils import is_masking_supported
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, PyTorchObs, Schedule
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv
from torch import nn
from torch.nn import functional as F

from sb3_trpo_ext.common.lean_policy import categorical_draw, latents_fn, make_buffer_add, rollout_obs_tensor
from sb3_trpo_ext.common.lean_vec_env import make_lean_env_step
from sb3_trpo_ext.common.numerics import CATEGORICAL, DistParams
from sb3_trpo_ext.common.policy_utils import distribution_params, runs_as_defined
from sb3_trpo_ext.maskable.masks import check_action_masks, make_mask_getter, mask_component_sizes
from sb3_trpo_ext.maskable.policies import CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_trpo_ext.trpo.trpo import TRPO

SelfMaskableTRPO = TypeVar("SelfMaskableTRPO", bound="MaskableTRPO")


def unmasked_logits(distribution: Any) -> DistParams | None:
    """
    The normalised logits *before* masking of sb3-contrib's maskable distributions, still attached to the graph
    (``MaskableCategorical._original_logits``: one per action component), or ``None`` for anything else.
    """
    inner = getattr(distribution, "distribution", None)
    components = [inner] if inner is not None else getattr(distribution, "distributions", None)
    if not components or not all(isinstance(getattr(c, "_original_logits", None), th.Tensor) for c in components):
        return None
    return DistParams(CATEGORICAL, tuple(c._original_logits for c in components))


def _pass_learn_arguments(callback: BaseCallback, **arguments: Any) -> None:
    """
    Have the next ``on_training_start`` of ``callback`` (the one SB3's ``OnPolicyAlgorithm.learn`` makes right after
    ``_setup_learn``) also see ``arguments`` in its ``locals``: the arguments of :meth:`MaskableTRPO.learn` that SB3's
    ``learn`` does not take, which ``MaskablePPO``'s callbacks see there. The callback object itself is unchanged
    (``locals["callback"]`` is still the user's): an instance attribute, removed by its first call, or by the next
    installation if it was never called (a ``_setup_learn`` without ``learn``).
    """
    own = vars(callback)
    stale = getattr(own.get("on_training_start"), "_restore", None)
    if stale is not None:
        stale()
    had_own = "on_training_start" in own
    previous = own.get("on_training_start")
    on_training_start = callback.on_training_start

    def restore() -> None:
        if had_own:
            own["on_training_start"] = previous
        else:
            own.pop("on_training_start", None)

    def with_arguments(locals_: dict[str, Any], globals_: dict[str, Any]) -> None:
        restore()
        on_training_start({**locals_, **arguments}, globals_)

    with_arguments._restore = restore  # type: ignore[attr-defined]
    own["on_training_start"] = with_arguments


class MaskableTRPO(TRPO):
    """
    Trust Region Policy Optimization (TRPO) with invalid-action masking.

    Paper: https://arxiv.org/abs/1502.05477 (Schulman et al., 2015); masking: https://arxiv.org/abs/2006.14171
    (Huang and Ontanon, 2020). The same trust-region step as :class:`sb3_trpo_ext.TRPO`, on the *masked* policy
    ``pi(a|s, m)``: invalid actions get probability exactly 0, so they are never sampled, and the surrogate, the
    KL(old || new) of the line search, the Fisher-vector products and the gradient all see the masked
    distributions (the masks recorded with each sample in the rollout buffer).

    Masks come from the environment's ``action_masks()`` method (or sb3-contrib's ``ActionMasker`` wrapper), as for
    sb3-contrib's ``MaskablePPO``, whose policies, buffers, ``predict(..., action_masks=...)``, ``MaskableEvalCallback``
    and ``learn(..., use_masking=...)`` work unchanged. A mask that allows no action raises a ``ValueError`` naming
    the environment index. Supports Discrete, MultiDiscrete and (one-dimensional) MultiBinary actions.

    :param policy: The policy model to use (MlpPolicy, CnnPolicy, MultiInputPolicy, or a ``MaskableActorCriticPolicy``
        class)
    :param env: The environment to learn from (if registered in Gymnasium, can be str)
    :param learning_rate: The learning rate of the critic's Adam optimizer, a constant or a schedule of the
        progress remaining (from 1 to 0)
    :param n_steps: The number of steps to run for each environment per update
    :param batch_size: Minibatch size of the critic regression
    :param gamma: Discount factor
    :param cg_max_steps: Maximal number of conjugate-gradient iterations
    :param cg_damping: Damping added to the Fisher matrix, ``F + cg_damping * I``
    :param line_search_shrinking_factor: Step-size reduction factor ``alpha`` of the line search
    :param line_search_max_iter: Maximal number of candidate steps of the backtracking line search
    :param n_critic_updates: Number of epochs of critic regression per policy update
    :param gae_lambda: Factor for trade-off of bias vs variance for the Generalized Advantage Estimator
    :param use_sde: Must be False: gSDE applies to continuous actions only (kept for a signature identical to TRPO's)
    :param sde_sample_freq: Unused (kept for a signature identical to TRPO's)
    :param rollout_buffer_class: Rollout buffer class to use; ``MaskableRolloutBuffer`` (or its Dict version) if None
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation
    :param normalize_advantage: Whether to normalize the advantages (over the whole batch)
    :param target_kl: Trust-region radius ``delta``: bound on the mean KL(old || new) of the masked policies
    :param sub_sampling_factor: Use every k-th sample of the batch for the policy step
    :param stats_window_size: Window size for the rollout logging
    :param tensorboard_log: The log location for tensorboard (if None, no logging)
    :param policy_kwargs: Additional arguments to be passed to the policy on creation
    :param verbose: The verbosity level: 0 no output, 1 info, 2 debug
    :param seed: Seed for the pseudo random generators
    :param device: Device (cpu, cuda, ...) on which the code should be run
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    :param cg_residual_tol: Conjugate gradient stops once the squared residual norm is below this value
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    _standard_policy_classes: ClassVar[tuple[type[BasePolicy], ...]] = (MlpPolicy, CnnPolicy, MultiInputPolicy)
    _other_families: ClassVar[dict[str, str]] = {"RecurrentActorCriticPolicy": "RecurrentTRPO"}
    policy: MaskableActorCriticPolicy  # type: ignore[assignment]
    rollout_buffer: MaskableRolloutBuffer

    def __init__(
        self,
        policy: str | type[MaskableActorCriticPolicy],
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
        if use_sde:
            raise ValueError("Invalid hyperparameter use_sde=True: gSDE needs continuous actions, MaskableTRPO has none")
        super().__init__(
            policy,  # type: ignore[arg-type]
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            gamma=gamma,
            cg_max_steps=cg_max_steps,
            cg_damping=cg_damping,
            line_search_shrinking_factor=line_search_shrinking_factor,
            line_search_max_iter=line_search_max_iter,
            n_critic_updates=n_critic_updates,
            gae_lambda=gae_lambda,
            use_sde=False,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            normalize_advantage=normalize_advantage,
            target_kl=target_kl,
            sub_sampling_factor=sub_sampling_factor,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
            cg_residual_tol=cg_residual_tol,
        )
        self._use_masking = True
        if _init_setup_model:
            self._setup_model()

    @staticmethod
    def _check_spaces(observation_space: spaces.Space, action_space: spaces.Space) -> None:
        """Raise a ``ValueError`` naming an observation or action space MaskableTRPO cannot handle."""
        TRPO._check_spaces(observation_space, action_space)
        mask_component_sizes(action_space)  # Discrete, MultiDiscrete or 1-D MultiBinary only

    def _setup_model(self) -> None:
        if self.rollout_buffer_class is None:
            dict_obs = isinstance(self.observation_space, spaces.Dict)
            self.rollout_buffer_class = MaskableDictRolloutBuffer if dict_obs else MaskableRolloutBuffer
        # SB3's OnPolicyAlgorithm builds the policy with a ``use_sde`` argument, which maskable policies do not take:
        # build it through a thin factory that drops it, then restore the class (it is saved with the model).
        policy_class = self.policy_class

        def build_policy(*args: Any, use_sde: bool = False, **kwargs: Any) -> BasePolicy:
            return policy_class(*args, **kwargs)

        self.policy_class = build_policy  # type: ignore[assignment]
        try:
            super()._setup_model()
        finally:
            self.policy_class = policy_class
        if not isinstance(self.policy, MaskableActorCriticPolicy):
            raise ValueError(f"MaskableTRPO needs a policy that subclasses MaskableActorCriticPolicy, got {type(self.policy)}")
        if not isinstance(self.rollout_buffer, (MaskableRolloutBuffer, MaskableDictRolloutBuffer)):
            raise ValueError(f"MaskableTRPO needs a buffer that stores action masks, got {type(self.rollout_buffer)}")
        self._use_masking = True
        # Masks of the batch the policy step is working on, aligned with its samples (None: no masking)
        self._action_masks: th.Tensor | None = None
        # The normalised logits before masking of the last surrogate (for the Fisher-vector product), with the masked
        # logits it returned: they stand in for those only (not for another batch's of the same shape)
        self._unmasked: tuple[tuple[th.Tensor, ...], DistParams] | None = None

    # ----------------------------------------------------------------------------------------------------------
    # Rollouts
    # ----------------------------------------------------------------------------------------------------------
    def _action_masks_fn(self, env: VecEnv) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        """
        The masks of every environment for its current state: as ``get_action_masks(env)`` returns them (what
        ``MaskablePPO``'s callbacks see), and checked, as a boolean array of one row per environment: an empty mask
        raises, naming the environment index.
        """
        masks_of, action_space, n_envs = make_mask_getter(env), self.action_space, env.num_envs

        def masks() -> tuple[np.ndarray, np.ndarray]:
            raw = masks_of()
            return raw, check_action_masks(raw, action_space, n_envs)

        return masks

    def _lean_masked_step(self) -> Callable[[PyTorchObs, np.ndarray | None], tuple[np.ndarray, th.Tensor, th.Tensor]]:
        """
        ``policy(obs, action_masks=masks)`` during rollouts without modules and ``MaskableCategorical`` objects: the same
        tensor operations in the same order (normalised logits, ``-1e8`` where invalid, normalised again; the same
        ``torch.multinomial`` draw on the softmax as ``Categorical.sample``), so actions, values and log-probabilities
        are bit-identical (tested). Used for sb3-contrib's own maskable policy classes; any other policy class goes
        through its ``forward``.
        """
        policy = self.policy
        value_head, action_head = policy.value_net, policy.action_net
        if (
            type(policy) not in (MlpPolicy, CnnPolicy, MultiInputPolicy)
            or not runs_as_defined(policy)
            or type(value_head) is not nn.Linear
            or type(action_head) is not nn.Linear
        ):
            return self._generic_masked_step()
        sizes = mask_component_sizes(self.action_space)
        action_shape = (-1, *self.action_space.shape)  # type: ignore[misc]
        on_cpu = self.device.type == "cpu"

        # module-free for plain MLPs on Box observations (sb3-contrib's maskable policies have the same layout)
        latents = latents_fn(policy, self.observation_space)  # type: ignore[arg-type]
        invalid_logit = th.tensor(-1e8, dtype=action_head.weight.dtype, device=self.device)
        # the weights are fixed during a rollout (and updated in place): looked up once, not per step
        v_weight, v_bias, a_weight, a_bias = value_head.weight, value_head.bias, action_head.weight, action_head.bias

        def normalized(logits: th.Tensor) -> th.Tensor:
            return logits - logits.logsumexp(dim=-1, keepdim=True)  # as torch's Categorical(logits=...)

        def mask_tensor(masks: np.ndarray, shape: th.Size) -> th.Tensor:
            if on_cpu and masks.dtype == np.bool_:  # checked masks: a boolean array already
                valid = th.from_numpy(masks)
                return valid if valid.shape == shape else valid.reshape(shape)
            return th.as_tensor(masks, dtype=th.bool, device=self.device).reshape(shape)

        def masked_draw(logits: th.Tensor, valid: th.Tensor | None) -> tuple[np.ndarray, th.Tensor]:
            # MaskableCategorical: normalised logits; where masked, -1e8 replaces them; normalised again
            logits = normalized(logits)
            if valid is not None:
                logits = th.where(valid, logits, invalid_logit)
            return categorical_draw(normalized(logits), on_cpu)  # Categorical.sample

        if len(sizes) == 1:  # Discrete: one categorical component

            def step(obs: PyTorchObs, masks: np.ndarray | None) -> tuple[np.ndarray, th.Tensor, th.Tensor]:
                latent_pi, latent_vf = latents(obs)
                values = F.linear(latent_vf, v_weight, v_bias)
                logits = F.linear(latent_pi, a_weight, a_bias)
                action, log_prob = masked_draw(logits, None if masks is None else mask_tensor(masks, logits.shape))
                return action.reshape(action_shape), values, log_prob

            return step

        def multi_step(obs: PyTorchObs, masks: np.ndarray | None) -> tuple[np.ndarray, th.Tensor, th.Tensor]:
            latent_pi, latent_vf = latents(obs)
            values = F.linear(latent_vf, v_weight, v_bias)
            logits = F.linear(latent_pi, a_weight, a_bias)
            components = th.split(logits, sizes, dim=1)
            valid_parts: Any = (
                [None] * len(sizes) if masks is None else th.split(mask_tensor(masks, logits.shape), sizes, dim=1)
            )
            draws = [masked_draw(component, valid) for component, valid in zip(components, valid_parts)]
            actions = np.concatenate([action for action, _ in draws], axis=1)
            return actions.reshape(action_shape), values, th.stack([log_prob for _, log_prob in draws], dim=1).sum(dim=1)

        return multi_step

    def _generic_masked_step(self) -> Callable[[PyTorchObs, np.ndarray | None], tuple[np.ndarray, th.Tensor, th.Tensor]]:
        """``policy(obs, action_masks=masks)``, the actions as a NumPy array."""
        policy = self.policy

        def step(obs: PyTorchObs, masks: np.ndarray | None) -> tuple[np.ndarray, th.Tensor, th.Tensor]:
            actions, values, log_probs = policy(obs, action_masks=masks)  # type: ignore[arg-type]
            return actions.cpu().numpy(), values, log_probs

        return step

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
        use_masking: bool | None = None,
    ) -> bool:
        """
        Collect ``n_rollout_steps`` steps per environment with the masked policy, storing each step's masks with it
        (as ``MaskablePPO`` does). Truncated episodes are bootstrapped with the value of their last observation.

        :param env: The training environment
        :param callback: Callback called at every step (and at the beginning and end of the rollout)
        :param rollout_buffer: Buffer to fill (a ``MaskableRolloutBuffer`` or ``MaskableDictRolloutBuffer``)
        :param n_rollout_steps: Number of steps to collect per environment
        :param use_masking: Whether to use the environment's masks (default: the ``use_masking`` given to ``learn``)
        :return: True if ``n_rollout_steps`` steps were collected, False if the callback stopped the rollout
        """
        assert isinstance(rollout_buffer, (MaskableRolloutBuffer, MaskableDictRolloutBuffer)), "buffer must store masks"
        assert self._last_obs is not None, "No previous observation was provided"
        use_masking = self._use_masking if use_masking is None else use_masking
        if use_masking and not is_masking_supported(env):
            raise ValueError("Environment does not support action masking. Consider using ActionMasker wrapper")
        self.policy.set_training_mode(False)
        n_steps = 0
        action_masks: np.ndarray | None = None  # as the environments return them, for the callbacks
        checked_masks: np.ndarray | None = None  # one boolean row per environment
        rollout_buffer.reset()
        direct_add = make_buffer_add(rollout_buffer, classes=(MaskableRolloutBuffer,))
        mask_shape = (rollout_buffer.n_envs, getattr(rollout_buffer, "mask_dims", 0))
        env_step = make_lean_env_step(env) or env.step  # env.step's results with cheaper copies
        current_masks = self._action_masks_fn(env)
        callback.on_rollout_start()
        policy_step = self._lean_masked_step()  # from the weights as the callbacks leave them at rollout start

        while n_steps < n_rollout_steps:
            with th.no_grad():
                obs_tensor = rollout_obs_tensor(self._last_obs, self.device)  # type: ignore[arg-type]
                if use_masking:
                    action_masks, checked_masks = current_masks()
                actions, values, log_probs = policy_step(obs_tensor, checked_masks)
            new_obs, rewards, dones, infos = env_step(actions)
            self.num_timesteps += env.num_envs

            callback.update_locals(locals())
            if not callback.on_step():
                return False
            self._update_info_buffer(infos, dones)
            n_steps += 1

            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.reshape(-1, 1)
            # Bootstrap truncated episodes with the value of their last observation (SB3 issue 633)
            for idx, done in enumerate(dones):
                if done and infos[idx].get("terminal_observation") is not None and infos[idx].get("TimeLimit.truncated"):
                    terminal_obs = self.policy.obs_to_tensor(infos[idx]["terminal_observation"])[0]
                    with th.no_grad():
                        terminal_value = self.policy.predict_values(terminal_obs)[0]
                    rewards[idx] += self.gamma * terminal_value

            if direct_add is None:
                rollout_buffer.add(
                    self._last_obs,  # type: ignore[arg-type]
                    actions,
                    rewards,
                    self._last_episode_starts,  # type: ignore[arg-type]
                    values,
                    log_probs,
                    action_masks=checked_masks,
                )
            else:  # MaskableRolloutBuffer.add: the masks, then RolloutBuffer.add
                if checked_masks is not None:
                    rollout_buffer.action_masks[rollout_buffer.pos] = checked_masks.reshape(mask_shape)
                direct_add(self._last_obs, actions, rewards, self._last_episode_starts, values, log_probs)  # type: ignore[arg-type]
            self._last_obs = new_obs  # type: ignore[assignment]
            self._last_episode_starts = dones

        with th.no_grad():
            values = self.policy.predict_values(obs_as_tensor(new_obs, self.device))  # type: ignore[arg-type]
        rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
        callback.on_rollout_end()
        return True

    def predict(  # type: ignore[override]
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
        action_masks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """
        The policy's action for an observation, restricted to the valid actions when ``action_masks`` is given.

        :param observation: The input observation (one, or a batch of ``n_envs``)
        :param state: Unused (no recurrent state), kept for the SB3 interface
        :param episode_start: Unused, kept for the SB3 interface
        :param deterministic: Whether to return the most likely valid action instead of sampling
        :param action_masks: Masks of valid actions (one row per observation); an empty mask raises a ``ValueError``
        :return: The action(s) and ``None``
        """
        if action_masks is not None:
            action_masks = check_action_masks(
                action_masks, self.action_space, self._observation_count(observation), "observation"
            )
        try:
            return self.policy.predict(observation, state, episode_start, deterministic, action_masks=action_masks)
        except ValueError as error:
            self._explain_predict_error(error, observation)
            raise

    # ----------------------------------------------------------------------------------------------------------
    # Training: the masked surrogate (KL, Fisher-vector product and line search follow from it)
    # ----------------------------------------------------------------------------------------------------------
    def _surrogate(
        self, observations: PyTorchObs, actions: th.Tensor, old_log_prob: th.Tensor, advantages: th.Tensor
    ) -> tuple[th.Tensor, DistParams]:
        """
        Surrogate ``L = mean(pi(a|s, m) / pi_old(a|s, m) * A)`` of the masked policy, the masks ``m`` being those of
        the batch under update (``self._action_masks``, aligned with ``observations``; no masking if None).

        :return: ``L`` and the masked distribution parameters it was computed from
        """
        distribution = self.policy.get_distribution(observations, action_masks=self._action_masks)  # type: ignore[arg-type]
        log_prob = distribution.log_prob(actions)
        ratio = th.exp(log_prob - old_log_prob)
        params = distribution_params(distribution)
        unmasked = unmasked_logits(distribution)
        self._unmasked = None if unmasked is None else (params.tensors, unmasked)
        return (ratio * advantages).mean(), params

    def _fisher_vector_product_fn(
        self, params: list[th.nn.Parameter], new: DistParams, old: DistParams, observations: PyTorchObs | None = None
    ) -> Callable[[th.Tensor], th.Tensor]:
        """
        TRPO's Fisher-vector product ``J^T M J / N``, with ``J`` the Jacobian of the logits *before* masking and ``M``
        the Fisher information of the masked distribution (``diag(p) - p p^T``, ``p`` the masked probabilities). It is
        the same matrix as with ``J`` through the masking: ``M`` is zero in the rows and columns of masked outcomes
        (``p = 0`` there), where masking changes the logits, and it annihilates the per-row shifts of the two
        normalisations (``M 1 = 0``). The backward passes then skip the masking and the second normalisation, whose
        ``exp`` of ``-1e8`` takes a slow path on the CPU.
        """
        stash, self._unmasked = self._unmasked, None
        if stash is not None:
            masked, unmasked = stash
            # only for the very logits the surrogate returned (same tensors), never for those of another batch
            same = len(masked) == len(new.tensors) and all(a is b for a, b in zip(masked, new.tensors))
            if same and [t.shape for t in unmasked.tensors] == [t.shape for t in new.tensors]:
                new = unmasked
        return super()._fisher_vector_product_fn(params, new, old, observations)

    @contextmanager
    def _policy_batch_context(self, rollout_data: Any, rows: slice) -> Iterator[None]:
        """The masks recorded with the samples of the policy step, for :meth:`_surrogate` while the step runs."""
        self._action_masks = rollout_data.action_masks[rows]
        try:
            yield
        finally:
            self._action_masks = None
            self._unmasked = None

    def learn(  # type: ignore[override]
        self: SelfMaskableTRPO,
        total_timesteps: int | float,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "MaskableTRPO",
        reset_num_timesteps: bool = True,
        use_masking: bool = True,
        progress_bar: bool = False,
    ) -> SelfMaskableTRPO:
        """
        Train the agent for ``total_timesteps`` environment steps.

        :param total_timesteps: The total number of samples (env steps) to train on
        :param callback: Callback(s) called at every step with state of the algorithm
        :param log_interval: The number of rollouts before logging
        :param tb_log_name: The name of the run for TensorBoard logging
        :param reset_num_timesteps: Whether or not to reset the current timestep number (used in logging)
        :param use_masking: Whether to use the environment's action masks (False: plain TRPO on all actions)
        :param progress_bar: Display a progress bar using tqdm and rich
        :return: The trained model
        """
        self._use_masking = use_masking
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        total_timesteps, callback = super()._setup_learn(
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )
        _pass_learn_arguments(callback, use_masking=self._use_masking)
        return total_timesteps, callback

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_action_masks", "_unmasked", "_use_masking"]
