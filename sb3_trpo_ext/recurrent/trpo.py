"""TRPO with recurrent (LSTM) policies, for Stable-Baselines3."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.buffers import RecurrentDictRolloutBuffer, RecurrentRolloutBuffer
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, PyTorchObs, Schedule
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv
from torch.autograd import forward_ad

from sb3_trpo_ext.common.critic import optimizer_update
from sb3_trpo_ext.common.errors import UnsupportedObservationSpaceError
from sb3_trpo_ext.common.lean_vec_env import make_lean_env_step
from sb3_trpo_ext.common.numerics import DistParams, fisher_weight_operator, jacobian_transpose_vector
from sb3_trpo_ext.common.policy_utils import (
    all_finite,
    distribution_params,
    index_observations,
    parameters_replaced,
    process_wide,
    runs_as_defined,
    split_actor_critic_parameters,
)
from sb3_trpo_ext.recurrent.lean_step import make_lean_recurrent_step, zero_at_starts
from sb3_trpo_ext.recurrent.lstm_tangent import JacobianVector, make_lstm_jacobian_vector
from sb3_trpo_ext.recurrent.policies import CnnLstmPolicy, MlpLstmPolicy, MultiInputLstmPolicy
from sb3_trpo_ext.trpo.trpo import TRPO, named_subspaces

SelfRecurrentTRPO = TypeVar("SelfRecurrentTRPO", bound="RecurrentTRPO")


@dataclass(frozen=True)
class SequenceBatch:
    """
    The rollout buffer as padded sequences (sb3-contrib's ``RecurrentRolloutBuffer`` layout), ready for one forward
    pass of the LSTM over all sequences at once.

    Row ``i * max_length + t`` of every flat tensor is step ``t`` of sequence ``i``; steps past the end of a sequence
    are padding. A sequence starts at an episode start (or where the buffer was cut), so an episode start can only be
    the first step of a sequence: its reset is applied to the initial states here, and ``episode_starts`` is all zero,
    which lets the LSTM run as one call instead of step by step (same result as ``_process_sequence``'s loop).

    :param n_seq: Number of sequences
    :param max_length: Length of the longest sequence (the padded length of all)
    :param states_pi: Initial actor LSTM states ``(h, c)`` of every sequence, reset where an episode starts
    :param states_vf: Initial critic LSTM states, likewise
    :param episode_starts: All zeros, one per row
    :param real: Flat indices of the real (non-padding) steps
    :param policy_rows: The real steps used by the policy step (every ``sub_sampling_factor``-th of ``real``)
    """

    n_seq: int
    max_length: int
    states_pi: tuple[th.Tensor, th.Tensor]
    states_vf: tuple[th.Tensor, th.Tensor]
    episode_starts: th.Tensor
    real: th.Tensor
    policy_rows: th.Tensor


def reset_at_sequence_starts(states: tuple[th.Tensor, ...], first_step_starts: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """
    Apply the LSTM reset ``h <- (1 - episode_start) h`` of each sequence's first step to its initial state
    (:func:`~sb3_trpo_ext.recurrent.lean_step.zero_at_starts`).

    :param states: ``(h, c)`` of shape ``(n_layers, n_seq, hidden)``
    :param first_step_starts: Episode-start flag of the first step of every sequence, shape ``(n_seq,)``
    :return: The reset ``(h, c)``
    """
    return zero_at_starts(states, first_step_starts.view(1, -1, 1) != 0)


class RecurrentTRPO(TRPO):
    """
    Trust Region Policy Optimization (TRPO) with recurrent (LSTM) policies.

    Paper: https://arxiv.org/abs/1502.05477 (Schulman et al., 2015); recurrent policies in TRPO: Section 8 and
    Appendix of the paper, and Wierstra et al., "Recurrent policy gradients" (2010). The same trust-region step as
    :class:`sb3_trpo_ext.TRPO`, for the policy ``pi(a_t | o_1..o_t)`` computed by an LSTM whose hidden state is carried
    across steps during rollouts and reset at episode starts (as in sb3-contrib's ``RecurrentPPO``, whose policies,
    buffers and ``predict(obs, state=..., episode_start=...)`` are used unchanged).

    The rollout buffer is read as padded sequences: each starts from the LSTM state recorded when its first step was
    collected, so the whole batch is replayed through the LSTM in one pass. The surrogate, KL(old || new), the
    Fisher-vector product ``J^T M J / N`` and the line search are means over the real steps only (``N`` real steps;
    padding is dropped before any of them). The critic (a separate LSTM by default) is fitted on minibatches of whole
    sequences with a loss masked to the real steps.

    :param policy: The policy model to use (MlpLstmPolicy, CnnLstmPolicy, MultiInputLstmPolicy, or a
        ``RecurrentActorCriticPolicy`` class)
    :param env: The environment to learn from (if registered in Gymnasium, can be str)
    :param learning_rate: The learning rate of the critic's Adam optimizer, a constant or a schedule of the
        progress remaining (from 1 to 0)
    :param n_steps: The number of steps to run for each environment per update
    :param batch_size: Minibatch size (in steps, rounded to whole sequences) of the critic regression
    :param gamma: Discount factor
    :param cg_max_steps: Maximal number of conjugate-gradient iterations
    :param cg_damping: Damping added to the Fisher matrix, ``F + cg_damping * I``
    :param line_search_shrinking_factor: Step-size reduction factor ``alpha`` of the line search
    :param line_search_max_iter: Maximal number of candidate steps of the backtracking line search
    :param n_critic_updates: Number of epochs of critic regression per policy update
    :param gae_lambda: Factor for trade-off of bias vs variance for the Generalized Advantage Estimator
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE)
    :param sde_sample_freq: Sample a new noise matrix every n steps when using gSDE
    :param rollout_buffer_class: Must be None (the buffer is always sb3-contrib's ``RecurrentRolloutBuffer`` or its Dict
        version); kept for a signature identical to TRPO's
    :param rollout_buffer_kwargs: Must be None, likewise
    :param normalize_advantage: Whether to normalize the advantages (over the real steps of the batch)
    :param target_kl: Trust-region radius ``delta``: bound on the mean KL(old || new) over the real steps
    :param sub_sampling_factor: Use every k-th real step in the policy step (all steps still feed the LSTM)
    :param stats_window_size: Window size for the rollout logging
    :param tensorboard_log: The log location for tensorboard (if None, no logging)
    :param policy_kwargs: Additional arguments to be passed to the policy on creation (``lstm_hidden_size``,
        ``n_lstm_layers``, ``shared_lstm``, ``enable_critic_lstm``, ...)
    :param verbose: The verbosity level: 0 no output, 1 info, 2 debug
    :param seed: Seed for the pseudo random generators
    :param device: Device (cpu, cuda, ...) on which the code should be run
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    :param cg_residual_tol: Conjugate gradient stops once the squared residual norm is below this value
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpLstmPolicy": MlpLstmPolicy,
        "CnnLstmPolicy": CnnLstmPolicy,
        "MultiInputLstmPolicy": MultiInputLstmPolicy,
    }
    _standard_policy_classes: ClassVar[tuple[type[BasePolicy], ...]] = (MlpLstmPolicy, CnnLstmPolicy, MultiInputLstmPolicy)
    _other_families: ClassVar[dict[str, str]] = {"MaskableActorCriticPolicy": "MaskableTRPO"}
    policy: RecurrentActorCriticPolicy
    rollout_buffer: RecurrentRolloutBuffer

    def __init__(
        self,
        policy: str | type[RecurrentActorCriticPolicy],
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
        for name, value in (("rollout_buffer_class", rollout_buffer_class), ("rollout_buffer_kwargs", rollout_buffer_kwargs)):
            if value is not None:
                raise ValueError(
                    f"Invalid hyperparameter {name}={value!r}: RecurrentTRPO always uses sb3-contrib's "
                    "RecurrentRolloutBuffer (RecurrentDictRolloutBuffer for Dict observations); it must be None"
                )
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
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=None,
            rollout_buffer_kwargs=None,
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
        self._last_lstm_states: RNNStates | None = None
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        try:
            super()._setup_model()  # the policy (and a plain buffer, replaced below: its shape needs the policy's LSTM)
        except TypeError as error:
            self._explain_lstm_size_error(error)
            raise
        if not isinstance(self.policy, RecurrentActorCriticPolicy):
            raise ValueError(
                f"RecurrentTRPO needs a policy that subclasses RecurrentActorCriticPolicy, got {type(self.policy)}"
            )
        lstm = self.policy.lstm_actor
        single_state_shape = (lstm.num_layers, self.n_envs, lstm.hidden_size)
        zeros = [th.zeros(single_state_shape, device=self.device) for _ in range(4)]
        self._last_lstm_states = RNNStates((zeros[0], zeros[1]), (zeros[2], zeros[3]))
        buffer_class = (
            RecurrentDictRolloutBuffer if isinstance(self.observation_space, spaces.Dict) else RecurrentRolloutBuffer
        )
        self.rollout_buffer = buffer_class(  # type: ignore[assignment]
            self.n_steps,
            self.observation_space,
            self.action_space,
            (self.n_steps, lstm.num_layers, self.n_envs, lstm.hidden_size),
            self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_envs=self.n_envs,
        )
        # The sequences of the batch under update (set by train() for the policy step and the critic regression)
        self._sequences: SequenceBatch | None = None

    def _explain_lstm_size_error(self, error: TypeError) -> None:
        """
        sb3-contrib's LSTM policies size their LSTM with SB3's ``get_flattened_obs_dim``, which gives a NumPy integer
        for MultiDiscrete observations (``sum(nvec)``), and ``torch.nn.LSTM`` rejects it (``RecurrentPPO`` fails the
        same way): raise an error naming the space instead. Returns for any other ``TypeError``.
        """
        observation_space = self.observation_space
        subspaces = [s for _, s in named_subspaces(observation_space)]
        if "input_size should be of type int" in str(error) and any(isinstance(s, spaces.MultiDiscrete) for s in subspaces):
            raise UnsupportedObservationSpaceError(
                f"Unsupported observation space {observation_space}: sb3-contrib's LSTM policies cannot take "
                "MultiDiscrete observations (their input size is a NumPy integer, which torch.nn.LSTM rejects; "
                "RecurrentPPO fails the same way); one-hot encode them into a Box observation, or give a "
                "features_extractor_class whose features_dim is a Python int"
            ) from error

    def _reset_parameter_caches(self) -> None:
        super()._reset_parameter_caches()
        # Whether J v by forward-mode differentiation works for this policy (None: not tried yet)
        self._forward_mode_jvp: bool | None = None
        # Whether J v by the LSTM's tangent recurrence applies to this policy (None: not tried yet)
        self._lstm_tangent: bool | None = None

    # ----------------------------------------------------------------------------------------------------------
    # Rollouts
    # ----------------------------------------------------------------------------------------------------------
    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """
        Collect ``n_rollout_steps`` steps per environment, carrying the LSTM states of actor and critic from step to
        step (reset at episode starts) and storing the states each step started from, as ``RecurrentPPO`` does.
        Truncated episodes are bootstrapped with the value of their last observation (under the critic's state).

        :param env: The training environment
        :param callback: Callback called at every step (and at the beginning and end of the rollout)
        :param rollout_buffer: Buffer to fill (a ``RecurrentRolloutBuffer`` or ``RecurrentDictRolloutBuffer``)
        :param n_rollout_steps: Number of steps to collect per environment
        :return: True if ``n_rollout_steps`` steps were collected, False if the callback stopped the rollout
        """
        assert isinstance(rollout_buffer, (RecurrentRolloutBuffer, RecurrentDictRolloutBuffer)), "buffer must be recurrent"
        assert self._last_obs is not None and self._last_lstm_states is not None, "No previous observation was provided"
        self.policy.set_training_mode(False)
        n_steps = 0
        rollout_buffer.reset()
        if self.use_sde:
            self.policy.reset_noise(env.num_envs)
        env_step = make_lean_env_step(env) or env.step  # env.step's results with cheaper copies
        callback.on_rollout_start()
        # One LSTM step at a time with torch.lstm_cell where the policy allows (the policy's forward pass otherwise),
        # from the weights as the callbacks leave them at rollout start
        lean_step = make_lean_recurrent_step(self.policy, self.action_space, self.use_sde)
        lstm_states = deepcopy(self._last_lstm_states)

        while n_steps < n_rollout_steps:
            if self.use_sde and self.sde_sample_freq > 0 and n_steps % self.sde_sample_freq == 0:
                self.policy.reset_noise(env.num_envs)
            with th.no_grad():
                obs_tensor = obs_as_tensor(self._last_obs, self.device)  # type: ignore[arg-type]
                episode_starts = th.tensor(self._last_episode_starts, dtype=th.float32, device=self.device)
                if lean_step is not None:
                    actions, values, log_probs, lstm_states = lean_step(obs_tensor, lstm_states, episode_starts)
                else:
                    actions, values, log_probs, lstm_states = self.policy(obs_tensor, lstm_states, episode_starts)
                    actions = actions.cpu().numpy()
            clipped_actions = actions
            if isinstance(self.action_space, spaces.Box):
                clipped_actions = np.clip(actions, self.action_space.low, self.action_space.high)
            new_obs, rewards, dones, infos = env_step(clipped_actions)
            self.num_timesteps += env.num_envs

            callback.update_locals(locals())
            if not callback.on_step():
                return False
            self._update_info_buffer(infos, dones)
            n_steps += 1

            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.reshape(-1, 1)
            # Bootstrap truncated episodes with the value of their last observation (SB3 issue 633)
            for idx, done_ in enumerate(dones):  # RecurrentPPO's loop (and names, for callbacks reading locals)
                if (
                    done_
                    and infos[idx].get("terminal_observation") is not None
                    and infos[idx].get("TimeLimit.truncated", False)
                ):
                    terminal_obs = self.policy.obs_to_tensor(infos[idx]["terminal_observation"])[0]
                    with th.no_grad():
                        terminal_lstm_state = (
                            lstm_states.vf[0][:, idx : idx + 1, :].contiguous(),
                            lstm_states.vf[1][:, idx : idx + 1, :].contiguous(),
                        )
                        not_a_start = th.zeros(1, dtype=th.float32, device=self.device)
                        terminal_value = self.policy.predict_values(terminal_obs, terminal_lstm_state, not_a_start)[0]  # type: ignore[arg-type]
                    rewards[idx] += self.gamma * terminal_value

            rollout_buffer.add(
                self._last_obs,  # type: ignore[arg-type]
                actions,
                rewards,
                self._last_episode_starts,  # type: ignore[arg-type]
                values,
                log_probs,
                lstm_states=self._last_lstm_states,
            )
            self._last_obs = new_obs  # type: ignore[assignment]
            self._last_episode_starts = dones
            self._last_lstm_states = lstm_states

        with th.no_grad():
            episode_starts = th.tensor(dones, dtype=th.float32, device=self.device)
            values = self.policy.predict_values(obs_as_tensor(new_obs, self.device), lstm_states.vf, episode_starts)  # type: ignore[arg-type]
        rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
        callback.on_rollout_end()
        return True

    # ----------------------------------------------------------------------------------------------------------
    # Training: surrogate over the real steps of the sequences (KL, Fisher-vector product and line search follow)
    # ----------------------------------------------------------------------------------------------------------
    def _split_parameters(self, observations: PyTorchObs) -> tuple[list[th.nn.Parameter], list[th.nn.Parameter]]:
        """Actor and critic parameters found by structure, as in TRPO, through the recurrent forward passes."""
        if self._actor_params is None or self._critic_params is None:
            policy, lstm = self.policy, self.policy.lstm_actor
            zeros = th.zeros((lstm.num_layers, 2, lstm.hidden_size), device=self.device)  # the split passes two rows
            start = th.zeros(2, device=self.device)
            # cuDNN refuses a backward pass through an LSTM in evaluation mode, one of the split's passes
            cuda = self.device.type == "cuda"
            with process_wide(th.backends.cudnn, "enabled", False) if cuda else nullcontext():
                self._actor_params, self._critic_params = split_actor_critic_parameters(
                    policy,
                    observations,
                    distribution_fn=lambda rows: policy.get_distribution(rows, (zeros, zeros), start)[0],  # type: ignore[arg-type]
                    value_fn=lambda rows: policy.predict_values(rows, (zeros, zeros), start),  # type: ignore[arg-type]
                )
        return self._actor_params, self._critic_params

    def _sequence_batch(self) -> SequenceBatch:
        """The sequences of the batch under update (set by :meth:`train`)."""
        if self._sequences is None:
            raise RuntimeError("RecurrentTRPO: no sequence batch is set; the policy step runs inside train()")
        return self._sequences

    def _surrogate(
        self, observations: PyTorchObs, actions: th.Tensor, old_log_prob: th.Tensor, advantages: th.Tensor
    ) -> tuple[th.Tensor, DistParams]:
        """
        Surrogate ``L = mean_t(pi(a_t|h_t) / pi_old(a_t|h_t) * A_t)`` over the real steps of the padded sequences:
        the LSTM replays every sequence from its stored initial state, then padding rows are dropped.

        :param observations: Padded observations of all sequences (``n_seq * max_length`` rows)
        :param actions: Padded actions, one row per observation row
        :param old_log_prob: Log-probabilities of the actions of the real steps used by the policy step, under the
            policy that collected them
        :param advantages: Their (normalised) advantages
        :return: ``L`` and the distribution parameters of those real steps only, so that the KL and the Fisher-vector
            product are means over real steps too
        """
        batch = self._sequence_batch()
        distribution, _ = self.policy.get_distribution(observations, batch.states_pi, batch.episode_starts)  # type: ignore[arg-type]
        log_prob = distribution.log_prob(actions)[batch.policy_rows]
        params = distribution_params(distribution)
        ratio = th.exp(log_prob - old_log_prob)
        return (ratio * advantages).mean(), DistParams(params.kind, tuple(t[batch.policy_rows] for t in params.tensors))

    def _fisher_vector_product_fn(
        self, params: list[th.nn.Parameter], new: DistParams, old: DistParams, observations: PyTorchObs | None = None
    ) -> Callable[[th.Tensor], th.Tensor]:
        """
        Fisher-vector product ``v -> J^T M J v / N + damping v`` over the real steps of the sequences.

        ``J^T (M J v)`` is one backward pass through the graph of ``new``. ``J v`` is, where it applies (sb3-contrib's
        ``get_distribution`` on a plain ``nn.LSTM``, see :mod:`~sb3_trpo_ext.recurrent.lstm_tangent`), the LSTM's
        tangent recurrence, whose coefficients come from one forward pass per update. Otherwise it is a forward-mode
        derivative: the LSTM replays the sequences with tangents on the actor parameters at every product
        (PyTorch's native LSTM kernels, which have forward-mode derivatives; oneDNN's, used elsewhere on the CPU,
        have none), several times slower than the recurrence. Both replace TRPO's "double backward" form, which
        differentiates through oneDNN's LSTM backward at every CG iteration; that form is used where neither
        applies (another device's LSTM kernels, a custom policy).

        :param params: Actor parameters
        :param new: Distribution parameters of the real steps used by the policy step, attached to the graph
        :param old: The same, detached
        :param observations: Padded observations of all sequences
        :return: The function computing the damped Fisher-vector product of a flat vector
        """
        if observations is None:
            return super()._fisher_vector_product_fn(params, new, old, observations)
        batch = self._sequence_batch()
        policy = self.policy
        offsets = np.cumsum([0] + [p.numel() for p in params])
        n_samples = new.tensors[0].shape[0]
        damping = self.cg_damping
        fisher_weight = fisher_weight_operator(old)

        def fvp_with(
            jacobian_vector_fn: Callable[[th.Tensor], Sequence[th.Tensor | None]],
        ) -> Callable[[th.Tensor], th.Tensor]:
            def fvp(vector: th.Tensor) -> th.Tensor:
                jv = [th.zeros_like(t) if d is None else d for t, d in zip(new.tensors, jacobian_vector_fn(vector))]
                return jacobian_transpose_vector(new, params, fisher_weight(jv)) / n_samples + damping * vector

            return fvp

        def directions_of(vector: th.Tensor) -> list[th.Tensor]:
            return [vector[offsets[i] : offsets[i + 1]].view_as(p) for i, p in enumerate(params)]

        def distribution_tensors(*values: th.Tensor) -> tuple[th.Tensor, ...]:
            with parameters_replaced(policy, {id(p): value for p, value in zip(params, values)}):
                distribution, _ = policy.get_distribution(observations, batch.states_pi, batch.episode_starts)  # type: ignore[arg-type]
            return tuple(t[batch.policy_rows] for t in distribution_params(distribution).tensors)

        def jacobian_vector(vector: th.Tensor) -> tuple[th.Tensor, ...]:  # forward mode through the whole policy
            # PyTorch's native LSTM kernels: oneDNN's have no forward-mode derivatives
            with th.no_grad(), process_wide(th.backends.mkldnn, "enabled", False), forward_ad.dual_level():
                duals = [forward_ad.make_dual(p.detach(), d) for p, d in zip(params, directions_of(vector))]
                outputs = distribution_tensors(*duals)
                return tuple(forward_ad.unpack_dual(out).tangent for out in outputs)

        def recurrence() -> JacobianVector | None:
            return make_lstm_jacobian_vector(
                policy, params, observations, batch.states_pi, batch.policy_rows, lambda d: distribution_params(d).tensors
            )

        if self._lstm_tangent is not False and not bool(batch.episode_starts.any()):
            if self._lstm_tangent is None:  # first use: checked once per model
                built = self._checked_recurrence(recurrence, new, int(offsets[-1]), directions_of, jacobian_vector)
                self._lstm_tangent = built is not None
            else:
                built = recurrence()
            if built is not None:
                tangent_jv = built[1]
                return fvp_with(lambda vector: tangent_jv(directions_of(vector)))
        if self._forward_mode_jvp is False:
            return super()._fisher_vector_product_fn(params, new, old, observations)
        fvp = fvp_with(jacobian_vector)
        if self._forward_mode_jvp is None:  # first use: check that forward mode runs through this policy
            try:
                jacobian_vector(th.zeros(int(offsets[-1]), device=new.tensors[0].device))
                self._forward_mode_jvp = True
            except (RuntimeError, NotImplementedError):
                self._forward_mode_jvp = False
                return super()._fisher_vector_product_fn(params, new, old, observations)
        return fvp

    @staticmethod
    def _checked_recurrence(
        recurrence: Callable[[], JacobianVector | None],
        new: DistParams,
        n_params: int,
        directions_of: Callable[[th.Tensor], list[th.Tensor]],
        forward_mode: Callable[[th.Tensor], tuple[th.Tensor, ...]],
    ) -> JacobianVector | None:
        """
        The LSTM's tangent recurrence, built, where it applies to this policy, else ``None``. It applies where its
        structure is one the recurrence knows, it runs (the heads in forward mode), its own forward pass gives the
        policy's distribution (within float32 rounding: oneDNN's LSTM rounds differently), and ``J v`` along a fixed
        random direction equals forward mode through the whole policy to 1e-4 (where forward mode runs; cuDNN's LSTM
        has none).

        :param recurrence: Builds the recurrence (``None`` where its structure does not apply)
        :param new: Distribution parameters of the real steps used by the policy step
        :param n_params: Number of actor parameters
        :param directions_of: Flat vector -> one direction per actor parameter
        :param forward_mode: Flat vector -> ``J v`` by forward mode through the whole policy
        """
        device = new.tensors[0].device
        vector = th.randn(n_params, generator=th.Generator(device).manual_seed(0), device=device)  # not the global RNG
        try:
            built = recurrence()
            if built is None:
                return None
            primal, jacobian_vector = built
            if len(primal) != len(new.tensors) or not all(
                mine.shape == theirs.shape and bool(th.allclose(mine, theirs.detach(), rtol=1e-3, atol=1e-4))
                for mine, theirs in zip(primal, new.tensors)
            ):
                return None
            tangents = jacobian_vector(directions_of(vector))
        except (RuntimeError, NotImplementedError, TypeError, AttributeError, ValueError):
            return None
        try:
            expected = forward_mode(vector)
        except (RuntimeError, NotImplementedError):
            return built  # no forward mode to compare with: the structural and forward-pass checks stand
        for mine, theirs, like in zip(tangents, expected, new.tensors):
            mine = th.zeros_like(like) if mine is None else mine
            theirs = th.zeros_like(like) if theirs is None else theirs
            if not bool(th.linalg.vector_norm(mine - theirs) <= 1e-4 * th.linalg.vector_norm(theirs) + 1e-12):
                return None
        return built

    def _critic_regression(self, observations: PyTorchObs, returns: th.Tensor) -> list[float]:
        """
        Fit the value function to the returns by Adam, ``n_critic_updates`` epochs of minibatches of whole sequences
        (about ``batch_size`` real steps each), the squared error averaged over real steps only. Gradients are
        computed for the critic parameters only, so the policy does not move.

        :param observations: Padded observations of all sequences
        :param returns: Padded returns (padding rows are ignored)
        :return: The value loss of every minibatch
        """
        batch = self._sequence_batch()
        _, critic_params = self._split_parameters(observations)
        losses: list[float] = []
        if not critic_params or self.n_critic_updates == 0:
            return losses
        optimizer = self.policy.optimizer
        update = optimizer_update(optimizer, critic_params)  # Adam's fused kernel where it applies
        step_losses: list[th.Tensor] = []
        seqs_per_batch = max(1, round(self.batch_size * batch.n_seq / max(1, batch.real.numel())))
        value_loss_of = self._critic_loss_fn(observations, returns, critic_params)
        for _ in range(self.n_critic_updates):
            permutation = th.randperm(batch.n_seq, device=returns.device)
            for start in range(0, batch.n_seq, seqs_per_batch):
                value_loss = value_loss_of(permutation[start : start + seqs_per_batch])
                update(th.autograd.grad(value_loss, critic_params))
                step_losses.append(value_loss.detach())
        optimizer.zero_grad(set_to_none=True)
        return [float(x) for x in th.stack(step_losses).tolist()] if step_losses else []

    def _critic_loss_fn(
        self, observations: PyTorchObs, returns: th.Tensor, critic_params: list[th.nn.Parameter], lean: bool = True
    ) -> Callable[[th.Tensor], th.Tensor]:
        """
        :param observations: Padded observations of all sequences
        :param returns: Padded returns (padding rows are ignored)
        :param critic_params: The critic's parameters
        :param lean: Whether :meth:`_lean_critic_loss_fn` may be used where it applies
        :return: ``seqs -> value loss`` of the minibatch of those sequences: the squared error of
            ``predict_values`` averaged over their real steps
        """
        batch = self._sequence_batch()
        real_mask = th.zeros(batch.n_seq * batch.max_length, dtype=th.bool, device=returns.device)
        real_mask[batch.real] = True
        real_mask = real_mask.view(batch.n_seq, batch.max_length)
        returns_seq = returns.view(batch.n_seq, batch.max_length)
        lean_loss = self._lean_critic_loss_fn(observations, returns_seq, real_mask, critic_params) if lean else None
        if lean_loss is not None:
            return lean_loss

        def loss(seqs: th.Tensor) -> th.Tensor:
            rows = (seqs[:, None] * batch.max_length + th.arange(batch.max_length, device=seqs.device)).flatten()
            states = (batch.states_vf[0][:, seqs].contiguous(), batch.states_vf[1][:, seqs].contiguous())
            values = self.policy.predict_values(
                index_observations(observations, rows),  # type: ignore[arg-type]
                states,
                batch.episode_starts[rows],
            ).view(len(seqs), batch.max_length)
            return ((values - returns_seq[seqs]) ** 2)[real_mask[seqs]].mean()

        return loss

    def _lean_critic_loss_fn(
        self, observations: PyTorchObs, returns_seq: th.Tensor, real_mask: th.Tensor, critic_params: list[th.nn.Parameter]
    ) -> Callable[[th.Tensor], th.Tensor] | None:
        """
        ``seqs -> value loss`` of a minibatch of sequences, as :meth:`_critic_loss_fn` computes it through
        ``predict_values``, with the per-update work done once: the features of every sequence, time first, and the
        returns and real-step weights in the same layout, so that a minibatch is a few index operations, the critic's
        LSTM and its heads. Applies to sb3-contrib's ``predict_values`` with a critic LSTM of its own and a features
        extractor the critic does not train, on sequences without episode starts; otherwise ``None``.
        """
        policy, batch = self.policy, self._sequence_batch()
        cls = type(policy)
        if (
            cls.predict_values is not RecurrentActorCriticPolicy.predict_values
            or cls._process_sequence is not RecurrentActorCriticPolicy._process_sequence  # type: ignore[comparison-overlap]
            or policy.lstm_critic is None
            or bool(batch.episode_starts.any())
            or not runs_as_defined(policy)  # its features are computed once per update, not once per minibatch
        ):
            return None
        critic_ids = {id(p) for p in critic_params}
        if any(id(p) in critic_ids for p in policy.vf_features_extractor.parameters()):
            return None
        with th.no_grad():
            features = super(ActorCriticPolicy, policy).extract_features(observations, policy.vf_features_extractor)  # type: ignore[arg-type]
        # as _process_sequence: (n_seq * T, k) -> (T, n_seq, k)
        features_tf = features.reshape(batch.n_seq, batch.max_length, -1).swapaxes(0, 1)
        returns_tf, real_tf = returns_seq.t(), real_mask.t().to(returns_seq.dtype)
        real_counts = real_mask.sum(dim=1).to(returns_seq.dtype)
        # steps up to each sequence's last real one (sb3-contrib pads sequences at their end)
        lengths = (real_mask.shape[1] - real_mask.flip(1).to(th.uint8).argmax(dim=1)).tolist()
        lstm, states = policy.lstm_critic, batch.states_vf

        def loss(seqs: th.Tensor) -> th.Tensor:
            # The LSTM runs up to the longest sequence of the minibatch only: the steps after it are padding of every
            # sequence in it, which the loss ignores and which cannot affect the earlier steps
            steps = max(lengths[k] for k in seqs.tolist())
            latent, _ = lstm(features_tf[:steps, seqs], (states[0][:, seqs], states[1][:, seqs]))
            values = policy.value_net(policy.mlp_extractor.forward_critic(latent)).squeeze(-1)
            squared = (values - returns_tf[:steps, seqs]).square() * real_tf[:steps, seqs]
            return squared.sum() / real_counts[seqs].sum()

        return loss

    def _prepare_sequences(self, data: Any) -> SequenceBatch:
        """
        Read a ``RecurrentRolloutBufferSamples`` as a :class:`SequenceBatch`: move each sequence's first-step reset
        into its initial states (episode starts occur only there), and find the real steps.
        """
        n_seq = data.lstm_states.pi[0].shape[1]
        max_length = data.episode_starts.shape[0] // n_seq
        starts = data.episode_starts.view(n_seq, max_length)
        if bool((starts[:, 1:] != 0).any()):  # cannot happen with sb3-contrib's sequencing; keep the exact loop then
            episode_starts = data.episode_starts
            states_pi, states_vf = data.lstm_states.pi, data.lstm_states.vf
        else:
            episode_starts = th.zeros_like(data.episode_starts)
            states_pi = reset_at_sequence_starts(data.lstm_states.pi, starts[:, 0])
            states_vf = reset_at_sequence_starts(data.lstm_states.vf, starts[:, 0])
        real = th.nonzero(data.mask > 0.5).flatten()
        return SequenceBatch(
            n_seq=n_seq,
            max_length=max_length,
            states_pi=states_pi,
            states_vf=states_vf,
            episode_starts=episode_starts,
            real=real,
            policy_rows=real[:: self.sub_sampling_factor],
        )

    def train(self) -> None:
        """Update the recurrent policy (one trust-region step) and the critic on the rollout buffer's sequences."""
        self._check_hyperparameters()
        self._forget_update_records()
        self._refresh_parameter_caches()
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)

        data = next(self.rollout_buffer.get(batch_size=None))  # every sequence, padded to the longest
        batch = self._prepare_sequences(data)
        observations, returns = data.observations, data.returns
        actions = data.actions.float()  # padded from the buffer's own dtype (int8 for MultiBinary)
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        obs_tensors = list(observations.values()) if isinstance(observations, dict) else [observations]
        batch_fields = [*obs_tensors, actions.float(), data.old_log_prob, data.advantages, returns]

        self._n_updates += 1
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        if not all_finite([t[batch.real] for t in batch_fields]):
            warnings.warn(
                "RecurrentTRPO: the rollout batch holds non-finite values; this update is skipped and the parameters "
                "are left unchanged",
                RuntimeWarning,
            )
            self._record_update("train/skipped_update", 1.0)
            return

        rows = batch.policy_rows
        advantages = data.advantages[rows]
        if self.normalize_advantage and advantages.numel() > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        self._sequences = batch
        try:
            # on a GPU, the policy step's graph is built without cuDNN's LSTM: the Fisher product may have to
            # differentiate through its backward (see _fisher_vector_product_fn), which cuDNN cannot
            cuda = self.device.type == "cuda"
            with process_wide(th.backends.cudnn, "enabled", False) if cuda else nullcontext():
                stats = self._policy_step(observations, actions, data.old_log_prob[rows], advantages)
            if stats.skipped is not None:
                warnings.warn(f"RecurrentTRPO: policy step skipped: {stats.skipped}; the policy is unchanged", RuntimeWarning)
            value_losses = self._guarded_critic_regression(observations, returns)
        finally:
            self._sequences = None
        self._log_train_stats(stats, value_losses)

    def _check_predict_inputs(self, observation: np.ndarray | dict[str, np.ndarray], state: Any, episode_start: Any) -> None:
        """
        ``state`` and ``episode_start`` of ``predict`` (used as in ``RecurrentPPO``) against the observations and the
        policy's LSTM: a state of another batch size or LSTM size, or not a (hidden, cell) pair, and flags of another
        length raise a ``ValueError`` saying which, where ``RecurrentPPO`` stops inside PyTorch, or silently reads two
        observations as one environment's sequence.
        """
        if state is None and episode_start is None:
            return
        count = self._observation_count(observation)
        if count is None:
            return  # the observation does not fit the space: the policy's own check names it
        layers, _, hidden = self.policy.lstm_hidden_state_shape
        expected = (layers, count, hidden)
        if state is not None:
            shapes = (
                [tuple(part.shape) if hasattr(part, "shape") else np.shape(part) for part in state]
                if isinstance(state, (tuple, list))
                else None
            )
            if shapes is None or len(shapes) != 2 or any(shape != expected for shape in shapes):
                got = f"{len(shapes)} arrays of shapes {shapes}" if shapes is not None else f"a {type(state).__name__}"
                raise ValueError(
                    f"state must be the (hidden, cell) pair predict returned for these observations: two arrays of "
                    f"shape {expected} (LSTM layers, observations, hidden size), got {got}. Pass state=None to start "
                    "from zeros"
                )
        if episode_start is not None:
            flags = np.shape(episode_start)
            if int(np.prod(flags)) != count:
                raise ValueError(f"episode_start must hold one flag per observation ({count}), got an array of shape {flags}")

    def learn(
        self: SelfRecurrentTRPO,
        total_timesteps: int | float,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "RecurrentTRPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfRecurrentTRPO:
        """
        Train the agent for ``total_timesteps`` environment steps.

        :param total_timesteps: The total number of samples (env steps) to train on
        :param callback: Callback(s) called at every step with state of the algorithm
        :param log_interval: The number of rollouts before logging
        :param tb_log_name: The name of the run for TensorBoard logging
        :param reset_num_timesteps: Whether or not to reset the current timestep number (used in logging)
        :param progress_bar: Display a progress bar using tqdm and rich
        :return: The trained model
        """
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_last_lstm_states", "_sequences", "_forward_mode_jvp", "_lstm_tangent"]
