"""
A cheaper ``policy(obs, lstm_states, episode_starts)`` for the rollouts of :class:`~sb3_trpo_ext.RecurrentTRPO`.

In a rollout the LSTM advances one step at a time. ``nn.LSTM`` spends most of such a call in set-up (on the CPU,
oneDNN's kernel takes several times longer for one step than the step itself), and ``RecurrentActorCriticPolicy``
adds module calls and ``torch.distributions`` objects. :func:`make_lean_recurrent_step` builds, once per rollout, a
function that advances each LSTM with ``torch.lstm_cell``, the kernel PyTorch's own (non-oneDNN) LSTM applies at
every step, then runs the same heads as :func:`~sb3_trpo_ext.common.lean_policy.make_lean_heads`. Its results are
bit-identical to ``policy(obs, lstm_states, episode_starts)`` with oneDNN off (``torch.backends.mkldnn.flags(
enabled=False)``); with oneDNN on, PyTorch's LSTM rounds differently, within a few float32 ulps.

It applies to sb3-contrib's recurrent policy classes with a one-layer, unidirectional ``nn.LSTM`` (separate,
shared or no critic LSTM), one features extractor for actor and critic, SB3's ``MlpExtractor`` and a diagonal
Gaussian (without gSDE) or a categorical action distribution, on the CPU; anything else gets ``None`` and uses the
policy's own forward pass. Flat Box observations skip the features extractor's module call (it only flattens them).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import (
    RecurrentActorCriticCnnPolicy,
    RecurrentActorCriticPolicy,
    RecurrentMultiInputActorCriticPolicy,
)
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.torch_layers import FlattenExtractor, MlpExtractor
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn
from torch.nn import functional as F

from sb3_trpo_ext.common.lean_policy import compile_plain_mlp, is_plain_box, make_lean_heads, plain_mlp
from sb3_trpo_ext.common.policy_utils import runs_as_defined

#: ``(obs, lstm_states, episode_starts) -> (actions as a NumPy array, values, log_probs, new lstm_states)``
RecurrentStep = Callable[[PyTorchObs, RNNStates, th.Tensor], tuple[np.ndarray, th.Tensor, th.Tensor, RNNStates]]
LSTMState = tuple[th.Tensor, ...]  # (hidden, cell), each (1, batch, hidden size)


#: The weights of layer ``k`` of an ``nn.LSTM`` are ``f"{name}_l{k}"`` for these names, in ``torch.lstm_cell``'s order
LSTM_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def is_plain_lstm(lstm: nn.Module) -> bool:
    """Whether ``lstm`` is an ``nn.LSTM`` itself, unidirectional, with biases, without projection, time first."""
    return (
        type(lstm) is nn.LSTM and not lstm.bidirectional and lstm.proj_size == 0 and bool(lstm.bias) and not lstm.batch_first
    )


def _single_step_lstm(lstm: nn.Module) -> Callable[[th.Tensor, LSTMState], LSTMState] | None:
    """
    One step of a one-layer unidirectional ``nn.LSTM`` on ``(batch, features)`` inputs and ``(1, batch, hidden)``
    states, as ``torch.lstm_cell`` (what PyTorch's native LSTM kernel runs at each step); ``None`` for other LSTMs.
    """
    if not is_plain_lstm(lstm) or lstm.num_layers != 1:
        return None
    w_ih, w_hh, b_ih, b_hh = (getattr(lstm, f"{name}_l0") for name in LSTM_WEIGHTS)

    def step(features: th.Tensor, state: LSTMState) -> LSTMState:
        hidden, cell = th.lstm_cell(features, (state[0][0], state[1][0]), w_ih, w_hh, b_ih, b_hh)
        return hidden.unsqueeze(0), cell.unsqueeze(0)

    return step


def zero_at_starts(state: tuple[th.Tensor, ...], starts: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """
    sb3-contrib's reset of the LSTM states of new episodes, ``(1 - episode_start) * state``, written as zeros: the
    same values for finite states, and a NaN state (from a NaN observation) does not outlive its episode (0 * NaN is
    NaN).

    :param state: ``(h, c)`` of shape ``(n_layers, n, hidden)``
    :param starts: Boolean, ``True`` where an episode starts, broadcastable to ``(n_layers, n, hidden)``
    :return: The reset ``(h, c)``
    """
    return state[0].masked_fill(starts, 0.0), state[1].masked_fill(starts, 0.0)


def make_lean_recurrent_step(
    policy: RecurrentActorCriticPolicy, action_space: spaces.Space, use_sde: bool
) -> RecurrentStep | None:
    """
    Build the rollout forward pass of a recurrent policy for its current weights (call it again after they change).

    :param policy: The recurrent policy
    :param action_space: The action space
    :param use_sde: Whether gSDE is used (then ``None``: the policy's own forward pass is used)
    :return: ``(obs_tensor, lstm_states, episode_starts) -> (actions, values, log_probs, lstm_states)``, the
        arguments and results of ``policy(obs_tensor, lstm_states, episode_starts)`` (``episode_starts`` a float32
        tensor; see the module docstring for the rounding of oneDNN's LSTM), or ``None``
    """
    classes = (RecurrentActorCriticPolicy, RecurrentActorCriticCnnPolicy, RecurrentMultiInputActorCriticPolicy)
    if type(policy) not in classes or use_sde or policy.device.type != "cpu" or not runs_as_defined(policy):
        return None
    if not policy.share_features_extractor or type(policy.mlp_extractor) is not MlpExtractor:
        return None
    flat_box = type(policy.features_extractor) is FlattenExtractor and is_plain_box(
        policy.observation_space, policy.normalize_images
    )
    actor_layers, critic_layers = plain_mlp(policy.mlp_extractor.policy_net), plain_mlp(policy.mlp_extractor.value_net)
    actor_lstm = _single_step_lstm(policy.lstm_actor)
    critic_lstm = None if policy.lstm_critic is None else _single_step_lstm(policy.lstm_critic)
    if actor_layers is None or critic_layers is None or actor_lstm is None:
        return None
    if policy.lstm_critic is not None and critic_lstm is None:
        return None
    linear_critic = policy.critic  # the critic without an LSTM of its own (neither separate nor shared)
    if policy.lstm_critic is None and not policy.shared_lstm and type(linear_critic) is not nn.Linear:
        return None
    heads = make_lean_heads(policy, action_space, use_sde, numpy_elementwise=True)
    if heads is None:
        return None
    actor_mlp, critic_mlp = compile_plain_mlp(actor_layers), compile_plain_mlp(critic_layers)
    shared_lstm = policy.shared_lstm

    def features_of(obs: PyTorchObs) -> th.Tensor:
        if flat_box:  # preprocess_obs (float) and FlattenExtractor (flatten): no-ops on flat float32 observations
            assert isinstance(obs, th.Tensor)
            return obs if obs.dtype == th.float32 and obs.dim() == 2 else th.flatten(obs.float(), 1)
        return policy.extract_features(obs)  # type: ignore[return-value]  # one extractor: one tensor

    def step(
        obs: PyTorchObs, states: RNNStates, episode_starts: th.Tensor
    ) -> tuple[np.ndarray, th.Tensor, th.Tensor, RNNStates]:
        features = features_of(obs)
        state_pi, state_vf = states.pi, states.vf
        if episode_starts.numpy().any():  # _process_sequence resets the states of new episodes (only if there is one)
            starts = episode_starts.view(1, -1, 1) != 0
            state_pi = zero_at_starts(state_pi, starts)
            if critic_lstm is not None:
                state_vf = zero_at_starts(state_vf, starts)
        new_pi = actor_lstm(features, state_pi)
        if critic_lstm is not None:
            new_vf = critic_lstm(features, state_vf)
            latent_vf = new_vf[0][0]
        elif shared_lstm:  # the critic reads the actor's LSTM output
            new_vf, latent_vf = new_pi, new_pi[0][0]
        else:  # a linear layer instead of an LSTM for the critic
            new_vf, latent_vf = new_pi, F.linear(features, linear_critic.weight, linear_critic.bias)  # type: ignore[union-attr]
        with np.errstate(all="ignore"):  # overflow and NaN propagate silently, as in torch
            actions, values, log_probs = heads(actor_mlp(new_pi[0][0]), critic_mlp(latent_vf))
        return actions, values, log_probs, RNNStates(new_pi, new_vf)

    return step
