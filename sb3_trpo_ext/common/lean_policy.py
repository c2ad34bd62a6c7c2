"""
A cheaper ``policy(obs)`` for rollouts.

During a rollout the policy's weights are fixed and it is called once per environment step on a handful of
observations, so ``ActorCriticPolicy.forward`` is dominated by Python overhead: module calls, ``torch.distributions``
objects and their argument checks. :func:`make_lean_policy_step` builds, once per rollout, a function that performs
the same tensor operations in the same order, with the same random draws, so actions, values and log-probabilities
are bit-identical to SB3's. It applies to SB3's own ``ActorCriticPolicy`` classes with a diagonal Gaussian (with or
without gSDE, unsquashed) or a categorical action distribution; anything else gets ``None`` and uses SB3's path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import (
    CategoricalDistribution,
    DiagGaussianDistribution,
    StateDependentNoiseDistribution,
)
from stable_baselines3.common.policies import ActorCriticCnnPolicy, ActorCriticPolicy, MultiInputActorCriticPolicy
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.torch_layers import FlattenExtractor, MlpExtractor
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn
from torch.nn import functional as F

PolicyStep = Callable[[PyTorchObs], tuple[th.Tensor, th.Tensor, th.Tensor]]
_HALF_LOG_TWO_PI = math.log(math.sqrt(2 * math.pi))  # the constant of torch.distributions.Normal.log_prob


def is_plain_box(observation_space: spaces.Space, normalize_images: bool) -> bool:
    """True for Box observations that SB3's preprocessing only casts to float (images are also divided by 255)."""
    return isinstance(observation_space, spaces.Box) and not (normalize_images and is_image_space(observation_space))


def plain_mlp(net: nn.Module) -> list[nn.Module] | None:
    """The layers of an ``nn.Sequential`` made only of ``Linear``, ``Tanh`` and ``ReLU`` (else ``None``)."""
    if type(net) is not nn.Sequential or not all(type(m) in (nn.Linear, nn.Tanh, nn.ReLU) for m in net):
        return None
    return list(net)


def run_plain_mlp(layers: list[nn.Module], x: th.Tensor) -> th.Tensor:
    """Forward pass through :func:`plain_mlp` layers with the functional ops their modules use."""
    for layer in layers:
        if isinstance(layer, nn.Linear):
            x = F.linear(x, layer.weight, layer.bias)
        elif isinstance(layer, nn.Tanh):
            x = th.tanh(x)
        else:
            x = th.relu(x)
    return x


def latents_fn(
    policy: ActorCriticPolicy, observation_space: spaces.Space
) -> Callable[[PyTorchObs], tuple[th.Tensor, th.Tensor]]:
    """``obs -> (latent_pi, latent_vf)`` as ``ActorCriticPolicy.forward`` computes them."""
    actor_net = critic_net = None
    if type(policy.mlp_extractor) is MlpExtractor:
        actor_net, critic_net = plain_mlp(policy.mlp_extractor.policy_net), plain_mlp(policy.mlp_extractor.value_net)
    flat_box = (
        type(policy.features_extractor) is FlattenExtractor
        and (policy.share_features_extractor or type(policy.vf_features_extractor) is FlattenExtractor)
        and is_plain_box(observation_space, policy.normalize_images)
    )
    if flat_box and actor_net is not None and critic_net is not None:
        actor_layers, critic_layers = actor_net, critic_net

        def mlp_latents(obs: PyTorchObs) -> tuple[th.Tensor, th.Tensor]:
            # preprocess_obs (float) and FlattenExtractor (flatten), then the two MLPs
            features = th.flatten(obs.float(), 1)  # type: ignore[union-attr]
            return run_plain_mlp(actor_layers, features), run_plain_mlp(critic_layers, features)

        return mlp_latents

    def module_latents(obs: PyTorchObs) -> tuple[th.Tensor, th.Tensor]:
        all_features = policy.extract_features(obs)
        if policy.share_features_extractor:
            return policy.mlp_extractor(all_features)
        pi_features, vf_features = all_features
        return policy.mlp_extractor.forward_actor(pi_features), policy.mlp_extractor.forward_critic(vf_features)

    return module_latents


def _normal_log_prob(actions: th.Tensor, mean: th.Tensor, minus_two_var: th.Tensor, log_scale: th.Tensor) -> th.Tensor:
    """
    ``log N(a; mean, std)`` term by term as ``torch.distributions.Normal.log_prob``, summed over action dimensions.
    ``-(d^2) / (2 var)`` is computed as ``d^2 / (-2 var)``: a sign flip is exact, so the result is the same bits.
    """
    return ((actions - mean) ** 2 / minus_two_var - log_scale - _HALF_LOG_TWO_PI).sum(dim=1)


def make_lean_policy_step(policy: ActorCriticPolicy, action_space: spaces.Space, use_sde: bool) -> PolicyStep | None:
    """
    Build the rollout forward pass for the current weights (call it again after the weights change).

    :param policy: The policy
    :param action_space: The action space
    :param use_sde: Whether gSDE is used
    :return: ``obs_tensor -> (actions, values, log_probs)`` bit-identical to ``policy(obs_tensor)``, or ``None``
    """
    if type(policy) not in (ActorCriticPolicy, ActorCriticCnnPolicy, MultiInputActorCriticPolicy):
        return None
    value_head, action_head = policy.value_net, policy.action_net
    if not isinstance(value_head, nn.Linear) or not isinstance(action_head, nn.Linear) or policy.squash_output:
        return None
    latents = latents_fn(policy, policy.observation_space)
    distribution = policy.action_dist
    action_shape = (-1, *action_space.shape)  # type: ignore[misc]

    if type(distribution) is DiagGaussianDistribution and not use_sde:
        # std = ones_like(mean) * exp(log_std) in SB3: the same numbers as exp(log_std) broadcast over the batch
        std_row = policy.log_std.exp()
        minus_two_var_row, log_scale_row = -(2 * std_row**2), std_row.log()

        def gaussian_step(obs: PyTorchObs) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
            latent_pi, latent_vf = latents(obs)
            values = F.linear(latent_vf, value_head.weight, value_head.bias)
            mean = F.linear(latent_pi, action_head.weight, action_head.bias)
            # Normal.sample is torch.normal(mean, std), which is standard normal noise scaled by std, then shifted by mean:
            # the same draws and the same two roundings, without torch.normal's slower broadcasting path
            actions = th.randn(mean.shape, dtype=mean.dtype, device=mean.device).mul_(std_row).add_(mean)
            log_prob = _normal_log_prob(actions, mean, minus_two_var_row, log_scale_row)  # rows broadcast over the batch
            return actions.reshape(action_shape), values, log_prob

        return gaussian_step

    if type(distribution) is StateDependentNoiseDistribution and use_sde and distribution.bijector is None:
        gsde = distribution
        std_sq = gsde.get_std(policy.log_std) ** 2

        def gsde_step(obs: PyTorchObs) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
            latent_pi, latent_vf = latents(obs)
            values = F.linear(latent_vf, value_head.weight, value_head.bias)
            mean = F.linear(latent_pi, action_head.weight, action_head.bias)
            # Normal(mean, sqrt(latent^2 @ std^2 + eps)); the action is mean + latent @ exploration matrix
            scale = th.sqrt(th.mm(latent_pi**2, std_sq) + gsde.epsilon)
            actions = mean + gsde.get_noise(latent_pi)
            log_prob = _normal_log_prob(actions, mean, -(2 * scale**2), scale.log())
            return actions.reshape(action_shape), values, log_prob

        return gsde_step

    if type(distribution) is CategoricalDistribution:

        def categorical_step(obs: PyTorchObs) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
            latent_pi, latent_vf = latents(obs)
            values = F.linear(latent_vf, value_head.weight, value_head.bias)
            logits = F.linear(latent_pi, action_head.weight, action_head.bias)
            # Categorical(logits): normalised logits, probabilities by softmax, one multinomial draw per row
            log_pmf = logits - logits.logsumexp(dim=-1, keepdim=True)
            actions = th.multinomial(F.softmax(log_pmf, dim=-1), 1, True).T.reshape(-1)
            log_prob = log_pmf.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
            return actions.reshape(action_shape), values, log_prob

        return categorical_step

    return None
