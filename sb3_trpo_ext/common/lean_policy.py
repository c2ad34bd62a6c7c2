"""
A cheaper ``policy(obs)`` for rollouts.

During a rollout the policy's weights are fixed and it is called once per environment step on a handful of
observations, so ``ActorCriticPolicy.forward`` is dominated by Python overhead: module calls, ``torch.distributions``
objects and their argument checks. :func:`make_lean_policy_step` builds, once per rollout, a function that performs
the same tensor operations in the same order, with the same random draws, so actions, values and log-probabilities
are bit-identical to SB3's. It applies to SB3's own ``ActorCriticPolicy`` classes with a diagonal Gaussian (with or
without gSDE, unsquashed), a categorical, a multi-categorical or a Bernoulli action distribution; anything else gets
``None`` and uses SB3's path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    MultiCategoricalDistribution,
    StateDependentNoiseDistribution,
)
from stable_baselines3.common.policies import ActorCriticCnnPolicy, ActorCriticPolicy, MultiInputActorCriticPolicy
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.torch_layers import FlattenExtractor, MlpExtractor
from stable_baselines3.common.type_aliases import PyTorchObs
from stable_baselines3.common.utils import obs_as_tensor
from torch import nn
from torch.distributions import Normal
from torch.nn import functional as F

from sb3_trpo_ext.common.policy_utils import all_finite, runs_as_defined

PolicyStep = Callable[[PyTorchObs], tuple[np.ndarray, th.Tensor, th.Tensor]]
PolicyHeads = Callable[[th.Tensor, th.Tensor], tuple[np.ndarray, th.Tensor, th.Tensor]]
_HALF_LOG_TWO_PI = math.log(math.sqrt(2 * math.pi))  # the constant of torch.distributions.Normal.log_prob
_HALF_LOG_TWO_PI_F32 = np.float32(_HALF_LOG_TWO_PI)  # torch subtracts a Python float from float32 as float32


def is_plain_box(observation_space: spaces.Space, normalize_images: bool) -> bool:
    """True for Box observations that SB3's preprocessing only casts to float (images are also divided by 255)."""
    return isinstance(observation_space, spaces.Box) and not (normalize_images and is_image_space(observation_space))


def plain_mlp(net: nn.Module) -> list[nn.Module] | None:
    """The layers of an ``nn.Sequential`` made only of ``Linear``, ``Tanh`` and ``ReLU`` (else ``None``)."""
    if type(net) is not nn.Sequential or not all(type(m) in (nn.Linear, nn.Tanh, nn.ReLU) for m in net):
        return None
    return list(net)


def compile_plain_mlp(layers: list[nn.Module]) -> Callable[[th.Tensor], th.Tensor]:
    """
    The forward pass through :func:`plain_mlp` layers with the functional ops their modules use, as one function
    built once: the layer types are resolved here, not at every call. The activations run in place on the fresh
    output of the layer before (the same kernel as ``nn.Tanh`` / ``nn.ReLU``).
    """
    steps: list[tuple[int, th.Tensor | None, th.Tensor | None]] = []
    for layer in layers:
        if isinstance(layer, nn.Linear):
            steps.append((0, layer.weight, layer.bias))
        else:
            steps.append((1 if isinstance(layer, nn.Tanh) else 2, None, None))
    if len(steps) == 4 and [kind for kind, _, _ in steps] == [0, 1, 0, 1]:  # SB3's default: two tanh layers
        (_, w1, b1), _, (_, w2, b2), _ = steps

        def two_tanh_layers(x: th.Tensor) -> th.Tensor:
            return F.linear(F.linear(x, w1, b1).tanh_(), w2, b2).tanh_()  # type: ignore[arg-type]

        return two_tanh_layers

    def generic(x: th.Tensor) -> th.Tensor:
        first = True  # the input is not ours to modify in place
        for kind, weight, bias in steps:
            if kind == 0:
                x, first = F.linear(x, weight, bias), False  # type: ignore[arg-type]
            elif kind == 1:
                x = th.tanh(x) if first else x.tanh_()
            else:
                x = th.relu(x) if first else x.relu_()
        return x

    return generic


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
        actor, critic = compile_plain_mlp(actor_net), compile_plain_mlp(critic_net)

        def mlp_latents(obs: PyTorchObs) -> tuple[th.Tensor, th.Tensor]:
            # preprocess_obs (float) and FlattenExtractor (flatten), then the two MLPs; both are no-ops on a batch
            # of flat float32 observations
            assert isinstance(obs, th.Tensor)  # a Box observation space
            features = obs if obs.dtype == th.float32 and obs.dim() == 2 else th.flatten(obs.float(), 1)
            return actor(features), critic(features)

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


def _normal_log_prob_np(actions: np.ndarray, mean: np.ndarray, minus_two_var: np.ndarray, log_scale: np.ndarray) -> th.Tensor:
    """
    :func:`_normal_log_prob` with the element-wise part in NumPy (CPU): subtraction, square, division are correctly
    rounded IEEE operations in both libraries, so the terms are the same bits; the sum over action dimensions stays
    torch's reduction, in the same order as SB3's.
    """
    terms = actions - mean
    np.square(terms, out=terms)
    np.divide(terms, minus_two_var, out=terms)
    np.subtract(terms, log_scale, out=terms)
    np.subtract(terms, _HALF_LOG_TWO_PI_F32, out=terms)
    return th.from_numpy(terms).sum(dim=1)


def rollout_obs_tensor(obs: np.ndarray | dict[str, np.ndarray], device: th.device) -> PyTorchObs:
    """
    ``obs_as_tensor(obs, device)`` for a rollout step: on the CPU, a numeric array becomes a tensor sharing its memory
    (what ``obs_as_tensor`` gives there) without its dispatch; anything else goes through ``obs_as_tensor``.
    """
    if device.type == "cpu" and type(obs) is np.ndarray and obs.dtype != np.object_:
        return th.from_numpy(obs)
    return obs_as_tensor(obs, device)


def _rows_text(rows: list[int]) -> str:
    """One index as a number, several as a list."""
    return str(rows[0]) if len(rows) == 1 else str(rows)


def _raise_for_nan_probabilities(probs: np.ndarray) -> None:
    """
    :param probs: Action probabilities, one row per environment, some of them NaN (softmax gives no inf and nothing
        negative otherwise)
    :raises ValueError: naming the environment indices whose probabilities are NaN
    """
    rows = np.flatnonzero(~(probs >= 0).all(axis=1)).tolist()
    raise ValueError(
        f"The policy's action probabilities are NaN for environment index {_rows_text(rows)}: "
        "its observation holds NaN or inf (VecCheckNan finds where), or the policy's weights do"
    )


def _nonfinite_rows(observations: np.ndarray | dict[str, np.ndarray]) -> list[int]:
    """Indices of the rows (environments) whose floating-point observation holds NaN or inf."""
    arrays = observations.values() if isinstance(observations, dict) else [observations]
    bad = np.zeros(0, dtype=bool)
    for array in map(np.asarray, arrays):
        if array.dtype.kind in "fc" and array.ndim > 0:
            row_bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
            bad = row_bad if len(bad) == 0 else bad | row_bad
    return np.flatnonzero(bad).tolist()


def explain_undefined_distribution(
    error: ValueError,
    observations: np.ndarray | dict[str, np.ndarray] | None,
    policy: th.nn.Module,
    unit: str = "environment",
) -> None:
    """
    Where SB3's own rollout step builds the action distribution (the policies the lean steps do not cover), a NaN
    observation or weight fails ``torch.distributions``' argument check with a message that names neither. Raise
    instead the error the lean steps raise: one naming the environment indices whose observations hold NaN or inf,
    or the weights. Returns (the caller re-raises ``error``) for any other ``ValueError`` or when neither explains it.

    :param error: The error raised during the rollout
    :param observations: The observations the failing step was given (``_last_obs``)
    :param policy: The policy
    :param unit: What one row of ``observations`` is, in the message (``"observation"`` in ``predict``)
    """
    message = str(error)
    if not (message.startswith("Expected parameter ") and " of distribution " in message):
        return
    rows = [] if observations is None else _nonfinite_rows(observations)
    if rows:
        raise ValueError(
            f"The policy's action distribution is NaN for {unit} index {_rows_text(rows)}: "
            + (
                "its observation holds NaN or inf (VecCheckNan finds where)"
                if unit == "environment"
                else "it holds NaN or inf"
            )
        ) from error
    if not all_finite(list(policy.parameters())):
        raise ValueError("The policy's action distribution is NaN: the policy's weights hold NaN or inf") from error


def categorical_draw(log_pmf: th.Tensor, on_cpu: bool) -> tuple[np.ndarray, th.Tensor]:
    """
    ``Categorical(logits=log_pmf).sample()`` (``torch.multinomial(softmax, 1, True)``) and the draws' log-probabilities.

    On the CPU, ``torch.multinomial`` with one sample draws one Exp(1) variable per probability and takes
    ``argmax(probs / draws)`` (the exponential form of the Gumbel-max trick): the same draws and division here, the
    argmax in NumPy (first maximum, as torch's), without its validity checks' extra kernels. Same bits and the same
    random-number state afterwards (tested); other devices call ``torch.multinomial``.

    :param log_pmf: Normalised logits, one row per sample
    :param on_cpu: Whether the tensors live on the CPU
    :return: The drawn outcomes as a column ``(n, 1)`` of int64, and their log-probabilities ``(n,)``
    """
    probs = F.softmax(log_pmf, dim=-1)
    if not on_cpu:
        # checked before the draw: on a GPU, torch.multinomial's own check is a device-side assertion, which leaves
        # the process's CUDA context unusable
        if not bool((probs >= 0).all()):
            _raise_for_nan_probabilities(probs.cpu().numpy())
        drawn = th.multinomial(probs, 1, True)
        return drawn.cpu().numpy(), log_pmf.gather(-1, drawn).squeeze(-1)
    draws = th.empty_like(probs).exponential_(1.0).numpy()
    probs_np = probs.numpy()
    if not (probs_np >= 0).all():
        _raise_for_nan_probabilities(probs_np)
    drawn_np = np.argmax(probs_np / draws, axis=1)  # draws > 0
    return drawn_np[:, None], th.from_numpy(log_pmf.numpy()[np.arange(len(drawn_np)), drawn_np])


def make_lean_policy_step(
    policy: ActorCriticPolicy, action_space: spaces.Space, use_sde: bool, numpy_elementwise: bool | None = None
) -> PolicyStep | None:
    """
    Build the rollout forward pass for the current weights (call it again after the weights change).

    :param policy: The policy
    :param action_space: The action space
    :param use_sde: Whether gSDE is used
    :param numpy_elementwise: Do the element-wise arithmetic after the network (sampling, log-probabilities) in NumPy
        instead of torch: fewer torch calls per step, the same bits. Default: on CPU only (tensors share memory with
        arrays there); the torch variant is kept for other devices.
    :return: ``obs_tensor -> (actions as a NumPy array, values, log_probs)`` bit-identical to ``policy(obs_tensor)``,
        or ``None``
    """
    if numpy_elementwise is None:
        numpy_elementwise = policy.device.type == "cpu"
    step = _make_step(policy, action_space, use_sde, numpy_elementwise)
    if step is None or not numpy_elementwise:
        return step
    inner = step

    def quiet_step(obs: PyTorchObs) -> tuple[np.ndarray, th.Tensor, th.Tensor]:
        with np.errstate(all="ignore"):  # overflow and NaN propagate silently, as in torch
            return inner(obs)

    return quiet_step


def _make_step(
    policy: ActorCriticPolicy, action_space: spaces.Space, use_sde: bool, numpy_elementwise: bool
) -> PolicyStep | None:
    """:func:`make_lean_policy_step` without its floating-point error guard."""
    if type(policy) not in (ActorCriticPolicy, ActorCriticCnnPolicy, MultiInputActorCriticPolicy):
        return None
    if not runs_as_defined(policy):  # hooks, parametrisations, a replaced forward: the policy's own forward pass
        return None
    heads = make_lean_heads(policy, action_space, use_sde, numpy_elementwise)
    if heads is None:
        return None
    latents = latents_fn(policy, policy.observation_space)

    def step(obs: PyTorchObs) -> tuple[np.ndarray, th.Tensor, th.Tensor]:
        return heads(*latents(obs))

    return step


def make_lean_heads(
    policy: ActorCriticPolicy, action_space: spaces.Space, use_sde: bool, numpy_elementwise: bool
) -> PolicyHeads | None:
    """
    The part of ``ActorCriticPolicy.forward`` after the latent features: the value head, the action head, one draw
    from the action distribution and its log-probability, the same tensor operations in the same order as SB3's.

    :param policy: The policy (an ``ActorCriticPolicy`` or a subclass that keeps its heads and distributions, such as
        sb3-contrib's ``RecurrentActorCriticPolicy``; the caller checks the class)
    :param action_space: The action space
    :param use_sde: Whether gSDE is used
    :param numpy_elementwise: See :func:`make_lean_policy_step`
    :return: ``(latent_pi, latent_vf) -> (actions as a NumPy array, values, log_probs)``, or ``None`` for a
        distribution or head it does not cover
    """
    value_head, action_head = policy.value_net, policy.action_net
    # exactly nn.Linear: a subclass may compute something else in its forward, which these steps would skip
    if type(value_head) is not nn.Linear or type(action_head) is not nn.Linear or policy.squash_output:
        return None
    distribution = policy.action_dist
    action_shape = (-1, *action_space.shape)  # type: ignore[misc]
    v_weight, v_bias, a_weight, a_bias = value_head.weight, value_head.bias, action_head.weight, action_head.bias

    if type(distribution) is DiagGaussianDistribution and not use_sde:
        # std = ones_like(mean) * exp(log_std) in SB3: the same numbers as exp(log_std) broadcast over the batch
        std_row = policy.log_std.exp()
        minus_two_var_row, log_scale_row = -(2 * std_row**2), std_row.log()
        rows = (std_row, minus_two_var_row, log_scale_row)
        std_np, minus_two_var_np, log_scale_np = (row.detach().cpu().numpy() for row in rows)

        def gaussian_step(latent_pi: th.Tensor, latent_vf: th.Tensor) -> tuple[np.ndarray, th.Tensor, th.Tensor]:
            values = F.linear(latent_vf, v_weight, v_bias)
            mean = F.linear(latent_pi, a_weight, a_bias)
            # Normal.sample is torch.normal(mean, std), which is standard normal noise scaled by std, then shifted by mean:
            # the same draws and the same two roundings, without torch.normal's slower broadcasting path
            noise = th.randn(mean.shape, dtype=mean.dtype, device=mean.device)
            if numpy_elementwise:
                mean_np, actions_np = mean.numpy(), noise.numpy()
                np.multiply(actions_np, std_np, out=actions_np)
                np.add(actions_np, mean_np, out=actions_np)
                log_prob = _normal_log_prob_np(actions_np, mean_np, minus_two_var_np, log_scale_np)
                return actions_np.reshape(action_shape), values, log_prob
            actions = noise.mul_(std_row).add_(mean)
            log_prob = _normal_log_prob(actions, mean, minus_two_var_row, log_scale_row)  # rows broadcast over the batch
            return actions.reshape(action_shape).cpu().numpy(), values, log_prob

        return gaussian_step

    if type(distribution) is StateDependentNoiseDistribution and use_sde and distribution.bijector is None:
        gsde = distribution
        std_sq = gsde.get_std(policy.log_std) ** 2

        def gsde_step(latent_pi: th.Tensor, latent_vf: th.Tensor) -> tuple[np.ndarray, th.Tensor, th.Tensor]:
            values = F.linear(latent_vf, v_weight, v_bias)
            mean = F.linear(latent_pi, a_weight, a_bias)
            # Normal(mean, sqrt(latent^2 @ std^2 + eps)); the action is mean + latent @ exploration matrix
            scale_t = th.sqrt(th.mm(latent_pi**2, std_sq) + gsde.epsilon)  # torch's sqrt (NumPy's differs in the last bit)
            matrices = gsde.exploration_matrices
            if not gsde.learn_features and 1 < len(latent_pi) == len(matrices):  # get_noise's batched case, inlined
                noise = th.bmm(latent_pi.unsqueeze(1), matrices).squeeze(1)
            else:
                noise = gsde.get_noise(latent_pi)
            if numpy_elementwise:
                scale, mean_np = scale_t.numpy(), mean.numpy()
                actions_np = mean_np + noise.numpy()
                minus_two_var = np.square(scale)
                np.multiply(minus_two_var, np.float32(-2.0), out=minus_two_var)  # -(2 x) is exactly (-2) x
                log_prob = _normal_log_prob_np(actions_np, mean_np, minus_two_var, scale_t.log().numpy())
                return actions_np.reshape(action_shape), values, log_prob
            actions = mean + noise
            log_prob = _normal_log_prob(actions, mean, -(2 * scale_t**2), scale_t.log())
            return actions.reshape(action_shape).cpu().numpy(), values, log_prob

        return gsde_step

    if type(distribution) is CategoricalDistribution:

        def categorical_step(latent_pi: th.Tensor, latent_vf: th.Tensor) -> tuple[np.ndarray, th.Tensor, th.Tensor]:
            values = F.linear(latent_vf, v_weight, v_bias)
            logits = F.linear(latent_pi, a_weight, a_bias)
            # Categorical(logits): normalised logits, probabilities by softmax, one multinomial draw per row
            drawn, log_prob = categorical_draw(logits - logits.logsumexp(dim=-1, keepdim=True), numpy_elementwise)
            return drawn.reshape(action_shape), values, log_prob

        return categorical_step

    if type(distribution) is MultiCategoricalDistribution:
        dims = list(distribution.action_dims)

        def multi_categorical_step(latent_pi: th.Tensor, latent_vf: th.Tensor) -> tuple[np.ndarray, th.Tensor, th.Tensor]:
            values = F.linear(latent_vf, v_weight, v_bias)
            logits = F.linear(latent_pi, a_weight, a_bias)
            # MultiCategorical: one Categorical(logits) per component of the split logits, drawn in order; the
            # log-probabilities stacked, then summed over the components
            draws, log_probs = [], []
            for part in th.split(logits, dims, dim=1):
                drawn, log_prob = categorical_draw(part - part.logsumexp(dim=-1, keepdim=True), numpy_elementwise)
                draws.append(drawn)
                log_probs.append(log_prob)
            return np.concatenate(draws, axis=1).reshape(action_shape), values, th.stack(log_probs, dim=1).sum(dim=1)

        return multi_categorical_step

    if type(distribution) is BernoulliDistribution:

        def bernoulli_step(latent_pi: th.Tensor, latent_vf: th.Tensor) -> tuple[np.ndarray, th.Tensor, th.Tensor]:
            values = F.linear(latent_vf, v_weight, v_bias)
            logits = F.linear(latent_pi, a_weight, a_bias)
            # Bernoulli(logits): probabilities by sigmoid, one torch.bernoulli draw per dimension; log-probability
            # -BCE-with-logits of the draw, summed over the dimensions
            probs = th.sigmoid(logits)
            if not bool((probs >= 0).all()):  # NaN: torch.distributions' argument check would stop here
                _raise_for_nan_probabilities(probs.cpu().numpy())
            actions = th.bernoulli(probs)
            log_prob = -F.binary_cross_entropy_with_logits(logits, actions, reduction="none")
            return actions.cpu().numpy().reshape(action_shape), values, log_prob.sum(dim=1)

        return bernoulli_step

    return None


def make_lean_noise_reset(policy: ActorCriticPolicy, n_envs: int) -> Callable[[], None] | None:
    """
    ``policy.reset_noise(n_envs)`` for a rollout, when gSDE is used: the exploration matrices are drawn as
    ``StateDependentNoiseDistribution.sample_weights`` draws them (``Normal(0, std).rsample()``, i.e.
    ``0 + standard_normal * std``, for the single matrix then for the batch), with the same random numbers, but the
    standard deviation and the ``Normal`` are built once per rollout: the weights are fixed during a rollout.

    :param policy: The policy
    :param n_envs: Number of environments (one exploration matrix each)
    :return: The reset function, or ``None`` where ``policy.reset_noise`` must be used
    """
    distribution = policy.action_dist
    if type(policy) not in (ActorCriticPolicy, ActorCriticCnnPolicy, MultiInputActorCriticPolicy):
        return None
    if type(distribution) is not StateDependentNoiseDistribution:
        return None
    gsde = distribution
    std = gsde.get_std(policy.log_std)
    weights_dist = Normal(th.zeros_like(std), std)
    loc, scale = weights_dist.loc, weights_dist.scale

    def reset() -> None:
        gsde.weights_dist = weights_dist
        gsde.exploration_mat = loc + th.empty(std.shape, dtype=loc.dtype, device=loc.device).normal_() * scale
        batch_noise = th.empty((n_envs, *std.shape), dtype=loc.dtype, device=loc.device).normal_()
        gsde.exploration_matrices = loc + batch_noise * scale

    return reset


def make_buffer_add(
    buffer: RolloutBuffer, classes: tuple[type[RolloutBuffer], ...] = (RolloutBuffer,)
) -> Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, th.Tensor, th.Tensor], None] | None:
    """
    ``RolloutBuffer.add`` without its defensive copies: the same values written to the same arrays (the array
    assignments copy). Only for SB3's own ``RolloutBuffer`` class (or the given subclasses whose ``add`` adds nothing
    else to ``RolloutBuffer.add`` that the caller does not do itself); any other buffer keeps its ``add``.

    :param buffer: The rollout buffer
    :param classes: The buffer classes this applies to (exact types)
    :return: ``(obs, actions, rewards, episode_starts, values, log_probs) -> None``, or ``None``
    """
    if type(buffer) not in classes:
        return None
    discrete_obs = isinstance(buffer.observation_space, spaces.Discrete)
    obs_shape = (buffer.n_envs, *buffer.obs_shape)
    action_shape = (buffer.n_envs, buffer.action_dim)

    def add(
        obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, starts: np.ndarray, values: th.Tensor, log_probs: th.Tensor
    ) -> None:
        pos = buffer.pos
        buffer.observations[pos] = obs.reshape(obs_shape) if discrete_obs else obs
        buffer.actions[pos] = actions.reshape(action_shape)
        buffer.rewards[pos] = rewards
        buffer.episode_starts[pos] = starts
        buffer.values[pos] = values.detach().cpu().numpy().flatten()
        buffer.log_probs[pos] = log_probs.detach().cpu().numpy()
        buffer.pos = pos + 1
        if buffer.pos == buffer.buffer_size:
            buffer.full = True

    return add
